"""Credentials: secrets encrypted at rest, handed only to their own task's tool calls.

A credential belongs to an owner (every task of that owner sees it) or to one task
(only that task sees it; it wins over the owner's credential of the same name). The
value is encrypted with Fernet (AES-128-CBC with HMAC-SHA256) under the keys in
``AGENTS_CREDENTIALS_KEY``: a comma-separated list where the first key encrypts and
every key decrypts, so a key is rotated by putting the new one first, running
``manage.py credentials rotate`` and then dropping the old one. Without that variable,
development and tests use a key derived from ``DJANGO_SECRET_KEY``; production refuses
to start without it (``agents_project/settings.py``).

The decrypted values only ever exist in a worker's memory while a task's tools run
(``tools.runner``); the same module masks them in everything that leaves the tool run.
"""

from __future__ import annotations

import base64
import hashlib
import re
import unicodedata
from functools import lru_cache
from typing import Any
from uuid import UUID

import structlog
from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from django.conf import settings
from django.contrib.auth.models import User
from django.core.exceptions import ImproperlyConfigured
from django.db import transaction
from django.db.models import Q, QuerySet
from django.utils import timezone

from agents_project.errors import InvalidInput, NotFound, RetryableError
from tools.models import Credential

logger = structlog.get_logger(__name__)

NAME = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")
MIN_VALUE_LENGTH = 8
MAX_VALUE_LENGTH = 8192


def _keys() -> tuple[str, ...]:
    keys = tuple(k.strip() for k in settings.AGENTS["CREDENTIALS_KEYS"] if k.strip())
    if keys:
        return keys
    # Development only (production refuses to start without a key): stable per secret key.
    digest = hashlib.sha256(f"agents-credentials:{settings.SECRET_KEY}".encode()).digest()
    return (base64.urlsafe_b64encode(digest).decode(),)


@lru_cache(maxsize=4)
def _fernet_for(keys: tuple[str, ...]) -> MultiFernet:
    try:
        return MultiFernet([Fernet(key) for key in keys])
    except (ValueError, TypeError):
        raise ImproperlyConfigured(
            "AGENTS_CREDENTIALS_KEY: every key must be a Fernet key (32 url-safe base64 bytes)"
        ) from None


def _fernet() -> MultiFernet:
    return _fernet_for(_keys())


def credential_encrypt(value: str) -> str:
    return _fernet().encrypt(value.encode()).decode()


def credential_decrypt(ciphertext: str) -> str:
    return _fernet().decrypt(ciphertext.encode()).decode()


def credential_set(
    *,
    owner: User,
    name: Any,
    value: Any,
    task_id: UUID | str | None = None,
    hosts: Any = (),
    any_host: bool = False,
    actor: str,
) -> Credential:
    """Store (or replace) the credential ``name`` of ``owner``, or of one of its tasks.

    ``hosts`` binds it to the hosts it may be sent to (``api.example.com``, or
    ``*.example.com`` for subdomains); a tool asking for it on the way to another host is
    refused (``ToolContext.credential``). One of ``hosts`` or ``any_host=True`` (the
    rare exception: any host the outbound policy allows, stored as ``["*"]`` and
    logged with the actor) is required: a credential is never unbound by default.

    ``InvalidInput`` names the bad field: a value that is not 8 to 8192 characters, that
    has a control character (a newline, a carriage return, a tab: such a value breaks
    the HTTP header it is put in, and the error would show it escaped), or surrounding
    blanks; a host that is not a host name. A task that is not ``owner``'s is
    ``NotFound``. The value is never logged.
    """
    if not isinstance(name, str) or not NAME.match(name):
        raise InvalidInput("must be 1-100 letters, digits, '_', '.' or '-'", field="name")
    if not isinstance(value, str) or len(value) < MIN_VALUE_LENGTH:
        # Every occurrence of a value is masked in what leaves a tool run: a very short
        # one would mask ordinary text too.
        raise InvalidInput(
            f"must be a string of at least {MIN_VALUE_LENGTH} characters", field="value"
        )
    if len(value) > MAX_VALUE_LENGTH:
        raise InvalidInput(f"is longer than {MAX_VALUE_LENGTH} characters", field="value")
    if any(unicodedata.category(char) == "Cc" for char in value):
        raise InvalidInput(
            "must not contain control characters (newline, carriage return, tab...)",
            field="value",
        )
    if value != value.strip():
        raise InvalidInput("must not start or end with blanks", field="value")
    bound = hosts_normalise(hosts)
    if any_host and bound:
        raise InvalidInput("give hosts or any_host, not both", field="hosts")
    if any_host:
        bound = (ANY_HOST,)
    elif not bound:
        raise InvalidInput(
            "name the hosts this credential may be sent to (--host), or allow any host "
            "explicitly (--any-host)",
            field="hosts",
        )
    task: Any = None
    if task_id is not None:
        # The task model through the credential's foreign key: tools import no app above.
        tasks = Credential._meta.get_field("task").related_model._default_manager
        task = tasks.filter(pk=_task_uuid(task_id), owner_id=owner.pk).first()
        if task is None:
            raise NotFound(f"no task {task_id} of {owner.get_username()}")
    now = timezone.now()
    ciphertext = credential_encrypt(value)
    fields = {"ciphertext": ciphertext, "hosts": list(bound), "updated_at": now}
    with transaction.atomic():
        credential, created = Credential.objects.update_or_create(
            owner_id=owner.pk,
            task=task,
            name=name,
            defaults=fields,
            create_defaults={**fields, "created_at": now},
        )
    logger.info(
        "credential stored",
        owner=owner.get_username(),
        credential=name,
        task_id=str(task.pk) if task else None,
        hosts=list(bound),
        any_host=any_host,
        created=created,
        actor=actor,
    )
    return credential


# The ``hosts`` of a credential set with ``any_host=True``: every host (fnmatch's "*").
ANY_HOST = "*"

_HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")


def hosts_normalise(hosts: Any) -> tuple[str, ...]:
    """Lower-cased host names (``*.`` allowed in front); ``InvalidInput`` on ``hosts``
    if one is not a DNS name (an address is refused: bind to the name you call)."""
    if isinstance(hosts, str) or not isinstance(hosts, list | tuple):
        raise InvalidInput("must be a list of host names", field="hosts")
    result: list[str] = []
    for host in hosts:
        if not isinstance(host, str):
            raise InvalidInput("must be a list of host names", field="hosts")
        name = host.strip().lower().rstrip(".")
        labels = (name[2:] if name.startswith("*.") else name).split(".")
        if (
            not name
            or len(name) > 253
            or not all(_HOST_LABEL.match(label) for label in labels)
            or labels[-1].isdigit()  # an address: bind to the name that is called
        ):
            raise InvalidInput(f"{host!r} is not a host name", field="hosts")
        if name not in result:
            result.append(name)
    return tuple(result)


def credential_delete(
    *, owner: User, name: str, task_id: UUID | str | None = None, actor: str
) -> None:
    """Delete the credential; ``NotFound`` if there is none by that name and scope."""
    credentials = Credential.objects.filter(owner_id=owner.pk, name=name)
    if task_id is None:
        credentials = credentials.filter(task__isnull=True)
    else:
        credentials = credentials.filter(task_id=_task_uuid(task_id))
    deleted, _ = credentials.delete()
    if not deleted:
        raise NotFound(f"no credential {name!r} of {owner.get_username()}")
    logger.info("credential deleted", owner=owner.get_username(), credential=name, actor=actor)


def credentials_rotate(*, actor: str) -> int:
    """Re-encrypt every credential under the first key. Safe to run any number of times."""
    fernet = _fernet()
    rotated = 0
    with transaction.atomic():
        for credential in Credential.objects.select_for_update().iterator():
            try:
                ciphertext = fernet.rotate(credential.ciphertext.encode()).decode()
            except InvalidToken:
                raise ImproperlyConfigured(
                    f"credential {credential.pk} cannot be decrypted with any configured key"
                ) from None
            Credential.objects.filter(pk=credential.pk).update(ciphertext=ciphertext)
            rotated += 1
    logger.info("credentials re-encrypted", count=rotated, actor=actor)
    return rotated


def credentials_for_task(*, task_id: UUID, owner_id: int) -> dict[str, str]:
    """The decrypted credentials one task's tools may use: its owner's, then its own."""
    return {name: value for name, (value, _) in task_credentials(task_id, owner_id).items()}


def task_credentials(task_id: UUID, owner_id: int) -> dict[str, tuple[str, tuple[str, ...]]]:
    """``{name: (value, hosts)}`` of the credentials one task's tools may use: its
    owner's, then its own (which wins over the owner's of the same name).

    Filtering on the owner too means a credential can never cross owners, even one
    pointing at another owner's task.
    """
    rows = (
        Credential.objects.filter(owner_id=owner_id)
        .filter(Q(task__isnull=True) | Q(task_id=task_id))
        .values_list("name", "task_id", "ciphertext", "hosts")
    )
    # The owner's first, so that the task's own credential of the same name wins.
    ordered = sorted(rows, key=lambda row: (row[1] is not None, row[0]))
    credentials: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, _, ciphertext, hosts in ordered:
        try:
            credentials[name] = (credential_decrypt(ciphertext), tuple(hosts or ()))
        except InvalidToken:
            # A key was removed before rotating: an operator must restore it.
            raise RetryableError(
                f"credential {name!r} cannot be decrypted with the configured keys "
                "(AGENTS_CREDENTIALS_KEY)"
            ) from None
    return credentials


def credential_list(*, owner: User | None = None) -> QuerySet[Credential]:
    """Credentials by name and scope, without their values (``None``: every owner's)."""
    credentials = Credential.objects.select_related("owner").defer("ciphertext")
    if owner is not None:
        credentials = credentials.filter(owner_id=owner.pk)
    return credentials.order_by("owner__username", "task_id", "name")


def _task_uuid(value: UUID | str) -> UUID:
    """A task id from user input; a malformed one is simply not found (``NotFound``)."""
    try:
        return value if isinstance(value, UUID) else UUID(str(value))
    except ValueError:
        raise NotFound(f"no task {value}") from None

"""The REST API (Django REST framework): translate HTTP to service calls and back.

Views only parse and validate the request, call a service or selector, and serialize
what comes back. ``ApplicationError`` becomes an HTTP error in one place
(``agents.api.errors.exception_handler``), with one body shape: ``Error``.
"""

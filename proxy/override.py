"""Method spoofing through a query parameter: ``POST /x?_method=DELETE`` runs as DELETE
in Laravel (by default), Symfony (when enabled) and Express's method-override, another
method than the one the policy judged. ``canonical.build`` refuses such a request
(``method_override_refused``) with the names of ``http.method_override_params``.
Pure: no I/O.
"""

from __future__ import annotations

from urllib.parse import unquote_plus


def override_param(query: str, names: frozenset[str]) -> str | None:
    """The first parameter of ``query`` a framework reads as one of ``names``, or None.
    Laravel, Symfony (when enabled) and Express's method-override execute ``POST
    /x?_method=DELETE`` as DELETE: another method than the one the policy judged. Names
    are compared percent-decoded and as PHP registers them (``php_names``:
    ``?.method=DELETE`` and ``?%20_method%00=DELETE`` are ``$_GET['_method']``);
    case-sensitively, as those frameworks do."""
    quick = query.find("ethod") < 0 and query.find("%") < 0
    if quick and all(n.find("ethod") >= 0 for n in names):
        return None  # the common case: no parameter can name one of them
    for param in query.split("&"):
        raw = param.partition("=")[0]
        if not names.isdisjoint(php_names(unquote_plus(raw))):
            return raw
    return None


def php_names(name: str) -> tuple[str, str]:
    """The names PHP may register a query parameter under (``php_register_variable_ex``):
    cut at a NUL, leading spaces skipped, ``.`` and space read as ``_``; with a ``[``,
    the array's name before it, or the ``[`` read as ``_`` when no ``]`` closes it."""
    name = name.partition("\0")[0].lstrip(" ").replace(".", "_").replace(" ", "_")
    return name.partition("[")[0], name.replace("[", "_")

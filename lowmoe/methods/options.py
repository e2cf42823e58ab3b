"""``--method-option KEY=VALUE``: each method's options, checked and converted before any work.

A method declares ``OPTIONS = {name: (default, kind)}`` with ``kind`` a type (``int``, ``float``,
``bool``) or a tuple of allowed strings; ``parse_options`` turns the strings the command line gives
into those values, or raises a one-line ConfigError naming the option, the method and what it expects.
"""

from __future__ import annotations

from ..errors import ConfigError

_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}


def parse_options(method: str, options: dict, spec: dict) -> dict:
    """Validate ``options`` against ``spec`` {name: (default, type or tuple of allowed strings)}."""
    out = {}
    for key, value in options.items():
        if key == "seed":
            continue
        if key not in spec:
            raise ConfigError(f"--method-option {key}: not an option of --method {method}; "
                              f"valid: {', '.join(sorted(spec)) or 'none'}")
    for key, (default, kind) in spec.items():
        v = options.get(key, default)
        where = f"--method-option {key}={v!r} (method {method})"
        if v is None or v == default:
            out[key] = v
        elif isinstance(kind, tuple):
            if str(v) not in kind:
                raise ConfigError(f"{where}: expected one of {', '.join(kind)}")
            out[key] = str(v)
        elif kind is bool:
            s = str(v).strip().lower()
            if isinstance(v, bool) or s in _TRUE | _FALSE:
                out[key] = v if isinstance(v, bool) else s in _TRUE
            else:
                raise ConfigError(f"{where}: expected true or false")
        else:
            try:
                out[key] = kind(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: expected a {kind.__name__}") from None
            if isinstance(out[key], (int, float)) and out[key] < 0:
                raise ConfigError(f"{where}: must be >= 0")
    return out

"""Parameters declare their logical axes where they are declared: a dataclass field made
by `weight(...)` names one logical axis per array axis ("heads", "embed", None for an
axis never split), and whether linear.project multiplies it (a projection, which the
precision policy may store narrower). parallel/sharding.py maps logical axes to mesh axes;
loading/params.py narrows the projections. A leaf module: imports nothing of ours."""

import dataclasses

_AXES = "logical_axes"
_PROJECTION = "projection"


def weight(*axes: str | None, projection: bool = False, **field_kwargs) -> dataclasses.Field:
    """A parameter field with its logical axes (field_kwargs: e.g. default=None)."""
    return dataclasses.field(metadata={_AXES: axes, _PROJECTION: projection}, **field_kwargs)


def field_axes(field: dataclasses.Field) -> tuple[str | None, ...] | None:
    """The logical axes a field declares; None where it declares none (replicated)."""
    return field.metadata.get(_AXES)


def is_projection(field: dataclasses.Field) -> bool:
    return bool(field.metadata.get(_PROJECTION))

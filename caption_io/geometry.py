"""The geometry of the image features: the encoder's square input, the grid of cells it ends in and
the channels of each cell. The backbone that makes the features fixes it (model/backbones.py),
metadata.json's "encoder" record carries it (and export.json's copy of that record), and the records,
the model, the plots, the page and attention correctness read it from there.

The map is stored and attended over flattened, row-major: a word's attention has `positions`
weights, position p = row * columns + column.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Geometry:
    input_size: int  # the encoder's input is input_size x input_size pixels
    rows: int        # the feature grid's height ...
    columns: int     # ... and width, in cells
    channels: int    # a cell's feature vector

    def __post_init__(self):
        for name in ("input_size", "rows", "columns", "channels"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"Geometry.{name} must be a positive int, got {value!r}")

    @property
    def grid(self) -> tuple[int, int]:
        return self.rows, self.columns

    @property
    def positions(self) -> int:
        return self.rows * self.columns

    @property
    def feature_shape(self) -> tuple[int, int]:
        """A stored image's features: [positions, channels]."""
        return self.positions, self.channels

    def describe(self) -> str:
        """"8x8x2048 features of 299x299 images": for error lines."""
        return f"{self.rows}x{self.columns}x{self.channels} features of {self.input_size}x{self.input_size} images"


# InceptionV3 without its top, the project's first and default encoder: 299x299 in, mixed10's
# 8x8x2048 out. Data directories and exports written before the geometry was recorded have it.
INCEPTION_V3 = Geometry(input_size=299, rows=8, columns=8, channels=2048)
DEFAULT = INCEPTION_V3


def of_encoder(record: dict | None) -> Geometry:
    """The geometry an "encoder" record (metadata.json's, or export.json's copy) gives; records
    written before it was recorded (InceptionV3 only) give INCEPTION_V3."""
    if not record or "grid" not in record:
        return INCEPTION_V3
    rows, columns = record["grid"]
    return Geometry(input_size=record["input_size"], rows=rows, columns=columns, channels=record["channels"])


def grid_of(positions: int, grid: tuple[int, int] | None = None) -> tuple[int, int]:
    """(rows, columns) of an attention row of `positions` weights: `grid` when given (and checked),
    else the square it must then be."""
    if grid is not None:
        rows, columns = grid
        if rows * columns != positions:
            raise ValueError(f"attention over {positions} positions does not fill a {rows}x{columns} grid")
        return rows, columns
    side = round(positions ** 0.5)
    if side * side != positions:
        raise ValueError(f"attention over {positions} positions is not a square grid: pass its grid")
    return side, side

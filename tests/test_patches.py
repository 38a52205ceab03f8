import math

import pytest
import torch

import torch.nn.functional as F

from pce.layers.patched_map import region_pool, region_view
from pce.layers.cells import CellGrid, CellWindows, cell_bounds, gather_windows
from pce.layers.patches import PatchExtractor
from pce.layers.positional import PositionalEncoding, patch_centers, patch_coordinates


@pytest.mark.parametrize("size,n", [((8, 8), 4), ((12, 8), 4), ((6, 9), 3), ((5, 5), 5), ((4, 4), 1)])
def test_round_trip_is_identity(size, n):
    x = torch.randn(2, 3, *size)
    ext = PatchExtractor(n)
    p, grid = ext.extract(x)
    assert p.shape == (2, (size[0] // n) * (size[1] // n), 3, n, n)
    assert torch.equal(ext.reassemble(p, grid), x)


def test_patches_are_row_major_blocks():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).reshape(1, 2, 4, 6)
    p, grid = PatchExtractor(2).extract(x)
    assert (grid.grid_h, grid.grid_w) == (2, 3)
    # patch 4 = grid row 1, column 1 -> rows 2:4, columns 2:4
    assert torch.equal(p[0, 4], x[0, :, 2:4, 2:4])


def test_overlap_round_trip_and_averaging():
    x = torch.randn(1, 2, 10, 10)
    ext = PatchExtractor(4, stride=2)
    p, grid = ext.extract(x)
    assert grid.grid_h == 4 and p.shape[1] == 16
    assert torch.allclose(ext.reassemble(p, grid), x, atol=1e-6)
    # add 1 to one patch: the pixels it covers rise by 1 / (number of patches covering them)
    bumped = p.clone()
    bumped[:, 0] += 1
    diff = ext.reassemble(bumped, grid) - x
    assert torch.allclose(diff[0, :, 0, 0], torch.ones(2))  # covered once
    assert torch.allclose(diff[0, :, 2, 2], torch.full((2,), 0.25))  # covered by 4 patches
    assert torch.allclose(diff[0, :, 5, 5], torch.zeros(2))


def test_indivisible_size_errors_or_pads_and_crops():
    x = torch.randn(1, 3, 10, 7)
    with pytest.raises(ValueError, match=r"10x7 does not fit patches of 4"):
        PatchExtractor(4).extract(x)
    ext = PatchExtractor(4, padding="pad")
    p, grid = ext.extract(x)
    assert grid.padded_size == (12, 8) and p.shape[1] == 6
    assert torch.equal(p[0, -1, :, 2:, 3:], torch.zeros(3, 2, 1))  # padding is zeros
    assert torch.equal(ext.reassemble(p, grid), x)


@pytest.mark.parametrize("size,n,expect", [
    ((56, 56), 16, (14, 4, 4, 0, 0)),   # 224 px input at stride 4: 4x4 patches of 14 instead of padding to 64
    ((28, 42), 8, (7, 4, 6, 0, 0)),     # non-square map, same shrunken side on both axes
    ((14, 14), 4, (4, 4, 4, 2, 2)),     # 14 is not 4 patches of an integer side: pad to 16 as "pad" does
    ((16, 16), 4, (4, 4, 4, 0, 0)),     # fits already: unchanged
    ((20, 12), 8, (8, 3, 2, 4, 4)),     # 20/3 and 12/2 differ: pad
    ((1, 1), 2, (2, 1, 1, 1, 1)),       # smaller than one patch: padded, as "pad" does
])
def test_fit_shrinks_patches_to_tile_the_map(size, n, expect):
    ext = PatchExtractor(n, padding="fit")
    grid = ext.grid(*size)
    assert (grid.patch_size, grid.grid_h, grid.grid_w, grid.pad_h, grid.pad_w) == expect
    x = torch.randn(2, 3, *size)
    p, _ = ext.extract(x, grid)
    m = grid.patch_size
    assert p.shape == (2, grid.num_patches, 3, m, m)
    assert torch.equal(ext.reassemble(p, grid), x)
    if not grid.pad_h:  # patch (1, 1) is the block at rows m:2m, columns m:2m
        assert torch.equal(p[:, grid.grid_w + 1], x[:, :, m:2 * m, m:2 * m])
    w = ext.extract_windows(x, grid, 1)
    assert w.shape[-1] == m + 2 and torch.equal(w[:, :, :, 1:-1, 1:-1], p)


def test_windows_have_neighbour_context():
    x = torch.randn(1, 2, 8, 8)
    ext = PatchExtractor(4)
    grid = ext.grid(8, 8)
    w = ext.extract_windows(x, grid, halo=1)
    assert w.shape == (1, 4, 2, 6, 6)
    assert torch.equal(w[:, :, :, 1:5, 1:5], ext.extract(x)[0])
    assert torch.equal(w[0, 0, :, 5, 1:5], x[0, :, 4, 0:4])  # halo row below patch 0 = first row of patch 2
    assert torch.equal(w[0, 0, :, 0], torch.zeros(2, 6))  # outside the map: zeros


def test_bad_patch_arguments():
    with pytest.raises(ValueError, match="stride"):
        PatchExtractor(4, stride=5)
    with pytest.raises(ValueError, match="padding"):
        PatchExtractor(4, padding="crop")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        PatchExtractor(2).extract(torch.randn(3, 4, 4))


def test_coordinates_match_definition():
    c = patch_coordinates(2, 3, 2, 2)
    assert c.shape == (4, 4, 6)
    assert c.min() == -1 and c.max() == 1
    # absolute patch coords are constant inside a patch, relative coords repeat in every patch
    assert torch.equal(c[1, :, 2:4], torch.zeros(4, 2))  # middle patch column -> x = 0
    assert torch.equal(c[2, 0:2, 0], torch.tensor([-1.0, 1.0]))
    assert torch.equal(c[2, 2:4, 0], torch.tensor([-1.0, 1.0]))
    centres = patch_centers(2, 3)
    assert torch.equal(centres[4], torch.tensor([1.0, 0.0]))


def test_fourier_features():
    enc = PositionalEncoding("fourier", num_frequencies=3)
    assert enc.num_channels == 4 + 24
    out = enc(2, 2, 4, 4, torch.device("cpu"), torch.float32)
    assert out.shape == (1, 28, 8, 8)
    coords = out[0, :4]
    # channel 4 = sin(pi * patch_y), channel 4 + 12 = cos(pi * patch_y)
    assert torch.allclose(out[0, 4], torch.sin(math.pi * coords[0]), atol=1e-6)
    assert torch.allclose(out[0, 16], torch.cos(math.pi * coords[0]), atol=1e-6)
    assert PositionalEncoding("none").num_channels == 0
    with pytest.raises(ValueError, match="kind"):
        PositionalEncoding("sine")


# -- cell grids ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size,parts,sides", [(45, 3, [15, 15, 15]), (64, 3, [21, 22, 21]), (17, 3, [6, 5, 6]),
                                              (23, 3, [8, 7, 8]), (2, 3, [1, 1]), (7, 1, [7])])
def test_cell_bounds_round_to_the_nearest_pixel(size, parts, sides):
    b = cell_bounds(size, parts)
    assert [y - x for x, y in zip(b, b[1:])] == sides
    assert list(b) == [math.floor(i * size / len(sides) + 0.5) for i in range(len(sides) + 1)]


def test_cell_grid_expand_and_place_are_consistent():
    g = CellGrid.split(17, 23, 3, 3)
    assert (g.grid_h, g.grid_w, g.num_patches, g.cell_h, g.cell_w, g.square_side) == (3, 3, 9, 6, 8, None)
    assert CellGrid.tiles(56, 40, 16).rows == (0, 14, 28, 42, 56) and CellGrid.tiles(56, 40, 16).grid_w == 3
    values = torch.randn(2, 9, 5)
    m = g.expand(values)  # [2, 5, 17, 23]
    for p in range(9):
        i, j = divmod(p, 3)
        block = m[:, :, g.rows[i]:g.rows[i + 1], g.cols[j]:g.cols[j + 1]]
        assert torch.equal(block, values[:, p, :, None, None].expand_as(block))
    buffers = torch.randn(2, 9, 5, g.cell_h, g.cell_w)
    placed = g.place(buffers)
    for p in range(9):
        i, j = divmod(p, 3)
        h, w = g.rows[i + 1] - g.rows[i], g.cols[j + 1] - g.cols[j]
        assert torch.equal(placed[:, :, g.rows[i]:g.rows[i + 1], g.cols[j]:g.cols[j + 1]], buffers[:, p, :, :h, :w])
    even = CellGrid.split(12, 8, 3, 2)  # equal cells: the permutation path
    cells = torch.randn(1, 6, 2, 4, 4)
    assert torch.equal(even.place(cells), PatchExtractor(4).reassemble(cells, PatchExtractor(4).grid(12, 8)))


def test_cell_windows_cover_the_receptive_fields():
    w = CellWindows.of((0, 3, 5), 10, k=3, s=2, d=1, pad=1)  # output cells [0, 3), [3, 5) of a stride-2 conv
    assert w.starts == (0, 6) and w.span == 7  # padded coordinates; the largest cell's field
    assert w.field == ((-1, 6), (5, 10)) and w.own == ((0, 6), (6, 10))
    assert w.own_mask(torch.device("cpu")).tolist() == [[False] + [True] * 6, [False] + [True] * 4 + [False] * 2]
    x = torch.arange(2 * 12 * 12.0).reshape(1, 2, 12, 12)
    win = gather_windows(x, w, w)  # [1, 4, 2, 7, 7]; the second window reaches 1 pixel past the map: zeros
    assert win.shape == (1, 4, 2, 7, 7)
    assert torch.equal(win[0, 1], F.pad(x[0, :, 0:7, 6:12], (0, 1)))


def test_region_pool_is_adaptive_average_pooling_of_each_region():
    x = torch.randn(2, 3, 13, 11)
    rows, cols = [(0, 5), (4, 13), (-2, 3)], [(0, 11), (9, 30)]  # overlapping, clipped, smaller than the bins
    out = region_pool(x, rows, cols, 4)
    assert out.shape == (2, 3, 12, 8)
    for i, (a, b) in enumerate(rows):
        for j, (c, d) in enumerate(cols):
            expect = F.adaptive_avg_pool2d(x[:, :, max(a, 0):b, max(c, 0):d], 4)
            torch.testing.assert_close(out[:, :, 4 * i:4 * i + 4, 4 * j:4 * j + 4], expect)
    view = region_view(x, rows, cols, 4, PositionalEncoding("coord"))
    assert view.patches_with_position().shape == (2, 6, 3 + 4, 4, 4) and view.positions.shape == (6, 2)


def test_window_cutting_and_cell_placing_have_exact_gradients():
    x = torch.randn(2, 3, 9, 8, dtype=torch.double, requires_grad=True)
    rows, cols = CellWindows.of((0, 3, 5), 9, 3, 2, 1, 1), CellWindows.of((0, 2, 4), 8, 3, 2, 1, 1)
    padded = lambda t: F.pad(t, (1, 1, 1, 1))  # noqa: E731
    assert torch.autograd.gradcheck(lambda t: gather_windows(padded(t), rows, cols), (x,))
    assert torch.autograd.gradcheck(lambda t: gather_windows(padded(t), rows, cols, [0, 5, 3, 7, 5, 2]), (x,))
    g = CellGrid.split(7, 5, 3, 2)
    cells = torch.randn(2, 6, 3, g.cell_h, g.cell_w, dtype=torch.double, requires_grad=True)
    assert torch.autograd.gradcheck(g.place, (cells,))

//! Launch geometry of the kernels in `udi_kernels.cu`: pure functions of the problem size. The
//! CUDA path converts them to cudarc's `LaunchConfig`; trainer/tests/cuda_source_on_cpu.rs runs
//! the kernel source on the CPU with the same grids, so the two cannot drift apart.

use candle_core::{bail, Result};

/// Grid and block dimensions (x, y, z) of one launch (no dynamic shared memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    pub grid: [u32; 3],
    pub block: [u32; 3],
}

/// One block of `threads` per row.
pub fn per_row(rows: usize, threads: u32) -> Geometry {
    Geometry {
        grid: [rows as u32, 1, 1],
        block: [threads, 1, 1],
    }
}

/// A grid-stride elementwise launch over `n` elements.
pub fn elementwise(n: usize) -> Geometry {
    let threads = 256u32;
    let blocks = n.div_ceil(threads as usize).clamp(1, 65_535 * 8) as u32;
    Geometry {
        grid: [blocks, 1, 1],
        block: [threads, 1, 1],
    }
}

/// `sq_norm_chunks`: a block of 256 threads (the kernel's SQ_THREADS) per chunk.
pub fn sq_norm_chunks(chunks: usize) -> Geometry {
    per_row(chunks, 256)
}

/// `sq_norm_segments`: a thread per segment.
pub fn sq_norm_segments(segments: usize) -> Geometry {
    Geometry {
        grid: [segments.div_ceil(128).max(1) as u32, 1, 1],
        block: [128, 1, 1],
    }
}

/// Threads per row-block for rows of `d` elements: a multiple of 32, at most 1024.
pub fn threads_for(d: usize) -> u32 {
    (d.div_ceil(32) * 32).clamp(32, 1024) as u32
}

/// `ln_fwd_*`, `ln_bwd_dx_*` and `residual_ln_fwd_*` on `rows` rows of `d`: one block per row.
pub fn layer_norm(rows: usize, d: usize) -> Geometry {
    per_row(rows, threads_for(d).min(512))
}

/// Rows per block of the LayerNorm dw/db reduction (one atomicAdd per column and block).
pub const LN_WB_ROWS: usize = 64;

/// `ln_bwd_wb_*`: the geometry and its `rows_per_block` argument. The kernel keeps 8 columns per
/// thread in registers, so `d` must be at most 8·threads.
pub fn layer_norm_wb(rows: usize, d: usize) -> Result<(Geometry, usize)> {
    let threads = threads_for(d).min(256).max(threads_for(d.div_ceil(8)));
    if d > 8 * threads as usize {
        bail!("layer_norm backward: last dim {d} > 8192");
    }
    Ok((
        per_row(rows.div_ceil(LN_WB_ROWS).max(1), threads),
        LN_WB_ROWS,
    ))
}

/// Rows per block of `col_sum_*` (one atomicAdd per column and block), at least.
pub const COL_SUM_ROWS: usize = 64;

/// Rows per block of the fused LayerNorm backward `ln_bwd_residual_*`.
pub const LN_RESIDUAL_ROWS: usize = 128;

/// `ln_bwd_residual_*`: 8 warps per block, a warp per row, [`LN_RESIDUAL_ROWS`] rows per block
/// (then one atomicAdd per column and block for dw/db), and its `rows_per_block` argument.
pub fn ln_residual(rows: usize) -> (Geometry, usize) {
    (
        per_row(rows.div_ceil(LN_RESIDUAL_ROWS).max(1), 256),
        LN_RESIDUAL_ROWS,
    )
}

/// `col_sum_*`: grid (⌈d/256⌉, ⌈rows/rows_per_block⌉) and its `rows_per_block` argument (grown
/// so that grid.y stays within 65 535).
pub fn col_sum(rows: usize, d: usize) -> (Geometry, usize) {
    let rpb = COL_SUM_ROWS.max(rows.div_ceil(65_535));
    let g = Geometry {
        grid: [d.div_ceil(256) as u32, rows.div_ceil(rpb).max(1) as u32, 1],
        block: [256, 1, 1],
    };
    (g, rpb)
}

/// One warp per row, 8 rows per block (`attn_softmax_*`, `weight_norm_*`, `weight_norm_bwd`).
pub fn warp_rows(rows: usize) -> Geometry {
    per_row(rows.div_ceil(8), 256)
}

/// The head's row kernels (`centered_softmax_*`, `soft_ce_{fwd,bwd,fused}_*`) on
/// rows of `k` logits: one block per row.
pub fn head_rows(rows: usize, k: usize) -> Geometry {
    per_row(rows, threads_for(k).min(1024))
}

/// `weighted_rows_*` over g groups of rows k wide: 256 columns per block, one block row per group.
pub fn weighted_rows(g: usize, k: usize) -> Geometry {
    Geometry {
        grid: [k.div_ceil(256) as u32, g as u32, 1],
        block: [256, 1, 1],
    }
}

/// The flash kernels' tiles (`flash_fwd_bf16`, `flash_bwd_dq_bf16`, `flash_bwd_dkdv_bf16`):
/// grid (⌈T/32⌉, H, B), 2 warps per block.
pub fn flash(b: usize, t: usize, heads: usize) -> Geometry {
    Geometry {
        grid: [t.div_ceil(32) as u32, heads as u32, b as u32],
        block: [64, 1, 1],
    }
}

/// `flash_bwd_dot_bf16` over `rows` token rows: one warp per (row, head), 8 warps per block.
pub fn flash_bwd_dot(rows: usize, heads: usize) -> Geometry {
    let warps = (rows * heads) as u32;
    Geometry {
        grid: [warps.div_ceil(8), 1, 1],
        block: [256, 1, 1],
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometries_cover_their_problems() {
        assert_eq!(threads_for(1), 32);
        assert_eq!(threads_for(100), 128);
        assert_eq!(threads_for(65_536), 1024);
        let g = elementwise(1000);
        assert_eq!((g.grid, g.block), ([4, 1, 1], [256, 1, 1]));
        assert_eq!(elementwise(0).grid, [1, 1, 1]);
        let (g, rpb) = layer_norm_wb(130, 384).unwrap();
        assert_eq!((g.grid[0], rpb), (3, 64));
        assert!(layer_norm_wb(1, 8193).is_err());
        let (g, rpb) = col_sum(99_328, 1536);
        assert_eq!((g.grid, rpb), ([6, 1552, 1], 64));
        assert_eq!(flash(2, 198, 6).grid, [7, 6, 2]);
        assert_eq!(flash_bwd_dot(396, 6).grid, [297, 1, 1]);
    }
}

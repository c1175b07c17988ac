"""The optimizer's kernels, one module per kernel; each holds its PyTorch reference (the spec), its
Triton kernel and the dispatch between them:

  top2.py           top2_mask: the 2:4 mask of a score (NoWag-P's start, the baselines)
  group_solve.py    solve_group_reference: the exact 6-pattern solve of one group (reference only)
  tile_sweep.py     sweep_tiles: the S-step over every group of every tile (+ the C++ CPU kernel)
  block_lstsq.py    block_lstsq: block-diagonal least squares, the A- and B-steps
  triton_switch.py  use_triton: the one Triton-or-reference switch the dispatch points share
"""

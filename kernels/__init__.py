"""fewstep.kernels: the fused solver update (``fewstep.kernels.fused_update``) and its AOT build (``.aot``).

Nothing is imported here: ``fewstep.kernels.fused_update`` stays the module (with ``fused_update``,
``fused_update_ref``, ``RowCoefs``, ``plan_coefs``, ``kernel_randn``), and triton is needed only to launch.
"""

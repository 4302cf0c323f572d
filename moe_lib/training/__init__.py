"""Training one model: the loop and its one ``train_step``, the optimizers and their schedule,
evaluation, precision, checkpoints, and the process's memory (allocator, peak memory).

Modules, read in this order: :mod:`.system` (device, CPU allocator, peak memory),
:mod:`.precision` (autocast, GradScaler, the optimizer step), :mod:`.muon`, :mod:`.optim`
(the optimizers and the LR schedule), :mod:`.evaluate`, :mod:`.checkpoint`, :mod:`.loop`.
"""

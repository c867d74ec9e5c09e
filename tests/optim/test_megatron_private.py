"""optim.megatron_private: what keel's optimizer does with megatron's internals; its one patch is applied
once however many optimizers are built (the resume tests at another layout exercise what it does)."""


def test_the_fully_reshardable_load_patch_is_applied_once():
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from optim.megatron_private import patch_fully_reshardable_load

    patch_fully_reshardable_load()
    patched = DistributedOptimizer._set_main_param_and_optimizer_states
    patch_fully_reshardable_load()  # a second optimizer built in the same process
    assert DistributedOptimizer._set_main_param_and_optimizer_states is patched and patched.keel_patched
    assert not getattr(patched.__wrapped__, "keel_patched", False)  # megatron's own method, wrapped once

"""Multi-node launch: two torchrun agents meet through torchrun's c10d rendezvous, as they would on
two nodes, and train exactly as one agent with two processes does."""

import subprocess
import sys

import torch.distributed as dist

from tests.helpers import MAIN, ROOT, child_env, losses, run_keel, tiny_overrides


def test_two_agents_with_c10d_rendezvous_match_one_agent(tiny_data, tmp_path):
    # the test hosts the rendezvous store on port 0 (the OS picks a free port, so nothing can race for
    # it); the agents only connect to it (is_host=false). Rank 0's agent then opens the workers' store
    # on port 0 too, so no port is ever chosen by hand.
    store = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
    two_nodes, one_node = tmp_path / "two_nodes", tmp_path / "one_node"
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{store.port}", "--rdzv-id", "keel-test",
              "--rdzv-conf", "is_host=false", "--local-addr", "127.0.0.1", str(MAIN)]
    agents = [subprocess.Popen(launch + tiny_overrides(tiny_data, two_nodes, steps=4), cwd=ROOT, env=child_env(),
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for _ in range(2)]
    outputs = [agent.communicate(timeout=300)[0] for agent in agents]
    assert [a.returncode for a in agents] == [0, 0], "\n".join(o[-3000:] for o in outputs)
    run_keel(tiny_overrides(tiny_data, one_node, steps=4), nproc=2)
    assert losses(two_nodes) == losses(one_node)
    assert len(losses(one_node)) == 4

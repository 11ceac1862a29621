"""trainer/graphs.py off the GPU: MicroSteps is a plain call there and clears grads to None.

    python -m pytest tests/trainer/test_graphs.py -q    (the GPU side: tests/trainer/test_graphs_gpu.py)
"""
import torch

from trainer.graphs import MicroSteps


def test_cpu_micro_steps_run_eagerly_and_clear_to_none():
    w = torch.nn.Parameter(torch.ones(3))
    steps = MicroSteps(torch.device("cpu"), [w], enabled=True)
    assert not steps.enabled  # graphs are a CUDA feature; asking on CPU is not an error

    def fwd_bwd(batch):
        (w * batch[0]).sum().backward()

    for x in (torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 1.0])):
        steps.run(fwd_bwd, (x,), key=(0,))
    assert torch.equal(w.grad, torch.tensor([2.0, 3.0, 4.0]))  # accumulated over both micro-batches
    assert steps.captures == 0 and not steps.graphs
    steps.clear([w])
    assert w.grad is None


def test_cuda_graphs_setting_is_on_by_default_and_in_the_hash():
    from trainer.config import config_hash
    from trainer.presets import load_config

    on = load_config("tiny", {})
    off = load_config("tiny", {"runtime.cuda_graphs": False})
    assert on.runtime.cuda_graphs is True
    assert config_hash(on) != config_hash(off)  # turning it off changes measured time: runs keep apart


def test_the_default_leaves_stored_hashes_unchanged():
    """A run stored before runtime.cuda_graphs existed hashes without the field; the default (on)
    must hash the same, or every stored experiment would rerun from scratch on resume."""
    import hashlib
    import json

    from trainer.config import HASH_EXCLUDED, HASH_NEUTRAL, config_hash, to_dict
    from trainer.presets import load_config

    cfg = load_config("speedrun", {"optim.muon.lr": 0.05})
    d = to_dict(cfg)
    d.pop("seed"), d.pop("preset")
    for key in HASH_EXCLUDED:
        section, leaf = key.split(".")
        d[section].pop(leaf)
    for key in HASH_NEUTRAL:  # the config as it was before these fields (runtime.cuda_graphs, ...)
        section, leaf = key.split(".")
        d[section].pop(leaf)
    assert "runtime.cuda_graphs" in HASH_NEUTRAL
    before = hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:12]
    assert config_hash(cfg) == before


def test_rebind_keeps_graphs_only_for_the_same_grads_and_context():
    """A kept MicroSteps (trainer.serve's next run) replays its graphs only where they would read
    and write the same memory: the same .grad tensors (zeroed for the new run) and the same context;
    anything else drops every graph. The graphs here are stand-ins: rebind only looks at the dict."""
    w = torch.nn.Parameter(torch.ones(3))
    steps = MicroSteps(torch.device("cpu"), [w], enabled=False)
    w.grad = torch.full((3,), 5.0)
    grad = w.grad

    def armed(context=(2, 100)):
        steps.graphs, steps._grads, steps.context = {("k",): object()}, [grad], context

    armed()
    steps.rebind([w], (2, 100))
    assert steps.graphs and w.grad is grad and torch.equal(grad, torch.zeros(3))  # kept, grads zeroed
    armed()
    steps.rebind([w], (4, 100))  # another loss scale (grad_accum) or table address
    assert not steps.graphs and steps._grads is None
    armed()
    w.grad = torch.zeros(3)  # a new .grad tensor: the graphs would accumulate into the old one
    steps.rebind([w], (2, 100))
    assert not steps.graphs
    armed()
    steps.rebind([w, torch.nn.Parameter(torch.ones(1))], (2, 100))  # other parameters
    assert not steps.graphs

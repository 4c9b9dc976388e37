"""Avalanche's own checkpointing (``avalanche.checkpointing.save_checkpoint`` /
``maybe_load_checkpoint``) of a ``CLIPHingeStrategy`` and of Avalanche's ``Naive``, resumed
in a new process.

Under torch 2.14 Avalanche's checkpoint fails for every strategy unless the package's
``compat`` is imported (it is, with ``avalanche_cliphinge.strategy``). Each run here: train
experience 0, evaluate, save the checkpoint and exit; a second process builds the strategy
again from another seed (so its random CLIP and MLP differ), loads the checkpoint, trains
experiences 1 and 2 and evaluates. It must end where an uninterrupted run in one process ends:
the same metrics (forgetting included, which needs the evaluator's memory of experience 0)
and the same model (every tensor: learned prompts, Gaussians, heads, the frozen CLIP).
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

SCRIPT = textwrap.dedent(
    '''
    """Usage: script.py DATA OUT STAGE[,STAGE...] KIND... (stages: reference, first, resume;
    kinds: cliphinge, naive)."""
    import json
    import random
    import sys
    from types import SimpleNamespace

    import dill

    import numpy as np
    import torch

    torch.set_num_threads(1)
    import avalanche_cliphinge.strategy  # noqa: F401  (what a user of the package imports)
    from avalanche.benchmarks import nc_benchmark
    from avalanche.checkpointing import maybe_load_checkpoint, save_checkpoint
    from avalanche.evaluation.metrics import accuracy_metrics, forgetting_metrics, loss_metrics
    from avalanche.models import SimpleMLP
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from torch.utils.data import TensorDataset

    from avalanche_cliphinge import CLIPHingeConfig, CLIPHingeStrategy

    data_file, out, stages, kinds = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]
    data = torch.load(data_file)


    class Labelled(TensorDataset):
        def __init__(self, x, y):
            super().__init__(x, y)
            self.targets = y.tolist()


    benchmark = nc_benchmark(
        Labelled(data["train_x"], data["train_y"]),
        Labelled(data["test_x"], data["test_y"]),
        n_experiences=3,
        task_labels=False,
        seed=0,
        fixed_class_order=list(range(6)),
    )
    CONFIG = CLIPHingeConfig(
        model_name="cliphinge-tiny", pretrained=None, init_class=2, increment=2,
        total_tasks=3, init_epochs=2, epochs=2, batch_size=16, eval_batch_size=64, seed=0,
        lr_decay_epochs=[100], second_stage_epochs=1, samples_per_old_class=4,
        lr=0.01, init_lr=0.01,  # with the default rates this tiny run forgets all but the last task
    )


    def build(kind, seed):
        torch.manual_seed(seed)
        random.seed(seed)
        np.random.seed(seed)
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True),
            forgetting_metrics(experience=True, stream=True),
            loss_metrics(stream=True),
            loggers=[],
        )
        if kind == "cliphinge":
            return CLIPHingeStrategy(
                config=CONFIG, class_names=data["names"], evaluator=evaluator, progress=False
            )
        model = SimpleMLP(num_classes=6, input_size=3 * 32 * 32, hidden_size=64)
        return Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9),
            criterion=torch.nn.CrossEntropyLoss(),
            train_mb_size=16,
            train_epochs=2,
            eval_mb_size=64,
            evaluator=evaluator,
        )


    def train(strategy, start):
        for experience in benchmark.train_stream[start:]:
            strategy.train(experience)
            metrics = strategy.eval(benchmark.test_stream)
        return metrics


    def record(name, strategy, metrics, **extra):
        torch.save(
            {
                "metrics": {k: float(v) for k, v in metrics.items()},
                "state": strategy.model.state_dict(),
                "iterations": strategy.clock.train_iterations,
                **extra,
            },
            f"{out}/{name}.pt",
        )


    def compiled_copies(strategy):
        """What the CUDA-only compiled parts become in a pickle (they are compiled lazily:
        nothing is compiled here)."""
        from avalanche_cliphinge.compiled_step import CompiledStep

        cache = strategy.feature_cache
        model = strategy.model
        model.compile_prompt_encoder()
        copy = dill.loads(dill.dumps(model))
        step = CompiledStep(strategy)
        entry = [SimpleNamespace(), torch.compile(lambda: 0), True]
        step._shapes, step._current, step._task_id = {("shape",): entry}, entry, 0
        step_copy = dill.loads(dill.dumps(step))
        with open(f"{out}/compiled.json", "w") as f:
            json.dump(
                {
                    "cache_bytes_at_save": cache.bytes_used,
                    "cache_max_bytes": cache.max_bytes,
                    "model_compiled": copy._encode_trainable != copy.encode_prompts,
                    "compiled_for_the_copy": (
                        copy._encode_trainable._torchdynamo_orig_callable.__self__ is copy
                    ),
                    "step_task_dropped": (
                        step_copy._shapes == {}
                        and step_copy._current is None
                        and step_copy._task_id is None
                    ),
                    "live_step_kept": step._current is not None and len(step._shapes) == 1,
                },
                f,
            )


    for stage in stages.split(","):
        for kind in kinds:
            if stage == "reference":
                strategy = build(kind, seed=0)
                record(f"{kind}-reference", strategy, train(strategy, 0))
            elif stage == "first":
                strategy = build(kind, seed=0)
                strategy.train(benchmark.train_stream[0])
                strategy.eval(benchmark.test_stream)
                save_checkpoint(strategy, f"{out}/{kind}.ckpt")
                if kind == "cliphinge":
                    compiled_copies(strategy)
            else:
                strategy = build(kind, seed=1)  # another random model: the checkpoint's replaces it
                fresh = {k: v.clone() for k, v in strategy.model.state_dict().items()}
                strategy, start = maybe_load_checkpoint(strategy, f"{out}/{kind}.ckpt")
                cache = getattr(strategy, "feature_cache", None)
                loaded_cache = None if cache is None else [cache.bytes_used, cache.max_bytes]
                metrics = train(strategy, start)
                record(
                    f"{kind}-resume",
                    strategy,
                    metrics,
                    start=start,
                    fresh=fresh,
                    loaded_cache=loaded_cache,
                )
    '''
)

KINDS = ["cliphinge", "naive"]


def run_stage(tmp_path, *args: str) -> None:
    done = subprocess.run(
        [sys.executable, str(tmp_path / "script.py"), str(tmp_path / "data.pt"), str(tmp_path)]
        + list(args),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.fixture(scope="module")
def checkpoint_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("avalanche_checkpoint")


@pytest.fixture(scope="module")
def runs(checkpoint_folder, synthetic_data, class_names):
    """``{kind: (uninterrupted record, resumed record)}``: process 1 runs the uninterrupted
    runs and the first experience of the interrupted ones (saving their checkpoints),
    process 2 resumes them."""
    tmp_path = checkpoint_folder
    (tmp_path / "script.py").write_text(SCRIPT)
    torch.save({**synthetic_data, "names": list(class_names)}, tmp_path / "data.pt")
    run_stage(tmp_path, "reference,first", *KINDS)
    for kind in KINDS:
        assert (tmp_path / f"{kind}.ckpt").is_file()
    run_stage(tmp_path, "resume", *KINDS)
    return {
        kind: (
            torch.load(tmp_path / f"{kind}-reference.pt"),
            torch.load(tmp_path / f"{kind}-resume.pt"),
        )
        for kind in KINDS
    }


@pytest.mark.parametrize("kind", KINDS)
def test_resumed_run_ends_as_the_uninterrupted_one(runs, kind):
    reference, resumed = runs[kind]
    assert resumed["start"] == 1  # the checkpoint's experience counter
    assert resumed["iterations"] == reference["iterations"]
    assert resumed["metrics"].keys() == reference["metrics"].keys()
    forgetting = "StreamForgetting/eval_phase/test_stream"
    assert forgetting in reference["metrics"]
    if kind == "cliphinge":  # the classes of experience 0 still count in the end
        assert reference["metrics"]["Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp000"] > 0.2
    for name, value in reference["metrics"].items():
        assert resumed["metrics"][name] == pytest.approx(value, abs=1e-6), name
    assert resumed["state"].keys() == reference["state"].keys()
    for name, tensor in reference["state"].items():
        torch.testing.assert_close(resumed["state"][name], tensor, rtol=0, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", KINDS)
def test_the_resumed_model_is_the_checkpoint_not_a_new_one(runs, kind):
    """The resuming process built its model from another seed: only the checkpoint can have
    made it equal to the reference (for CLIPHinge the frozen random CLIP too)."""
    reference, resumed = runs[kind]
    fresh, state = resumed["fresh"], reference["state"]
    shared = [k for k in fresh if k in state and fresh[k].shape == state[k].shape]
    differ = [k for k in shared if not torch.equal(fresh[k], state[k])]
    assert differ
    if kind == "cliphinge":
        assert any(k.startswith("clip.") for k in differ)
        # every task's prompts learned and restored
        ctx = sorted(
            k for k in reference["state"] if k.startswith("prompts.") and k.endswith(".ctx")
        )
        assert len(ctx) == 3


def test_process_local_parts_are_left_out_of_the_pickle(runs, checkpoint_folder):
    """The feature cache is pickled empty (same budget) and refilled on demand; the
    compiled prompt encoder (CUDA runs compile it) is compiled again for the unpickled model,
    bound to it; the compiled step's traced task is dropped from the pickle, not from the
    live strategy."""
    _, resumed = runs["cliphinge"]
    seen = json.loads((checkpoint_folder / "compiled.json").read_text())
    assert seen["cache_bytes_at_save"] > 0
    assert resumed["loaded_cache"] == [0, seen["cache_max_bytes"]]
    assert seen["model_compiled"] and seen["compiled_for_the_copy"]
    assert seen["step_task_dropped"] and seen["live_step_kept"]

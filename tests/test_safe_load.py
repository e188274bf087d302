"""Nothing read back from a store runs code: torch files load with weights_only=True, DeepSpeed's
checkpoint files through an allow-list; planted pickles are refused and their payload never runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from payloads import plant  # tests/ is on sys.path (pytest)

from frame_dist.train.safe_load import UnsafeCheckpointError, safe_load


def test_a_plain_state_dict_loads_and_a_planted_one_is_refused(tmp_path):
    good = tmp_path / "best.pt"
    torch.save({"w": torch.arange(3.0)}, good)
    assert torch.equal(safe_load(str(good), "best.pt")["w"], torch.arange(3.0))
    marker = tmp_path / "pwned"
    plant(str(tmp_path / "bad.pt"), str(marker))
    with pytest.raises(UnsafeCheckpointError) as err:
        safe_load(str(tmp_path / "bad.pt"), "s3://bucket/runs/x/best.pt")
    assert str(err.value).startswith("s3://bucket/runs/x/best.pt: refused to load: it needs "
                                     "unpickling beyond tensors and plain data")
    assert "posix.system" in str(err.value) or "os.system" in str(err.value)
    assert not marker.exists()


ENGINE = textwrap.dedent("""
    import json, os, sys, glob
    os.environ.update(MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import torch, torch.distributed as dist, deepspeed
    sys.path.insert(0, sys.argv[3])
    from payloads import plant
    from frame_dist.train.ray_loop import initialize_engine
    from frame_dist.train.safe_load import UnsafeCheckpointError, use_safe_loading
    stage, workdir = int(sys.argv[1]), sys.argv[2]
    dist.init_process_group("gloo", init_method=f"file://{workdir}/rendezvous", rank=0,
                            world_size=1)
    def engine():
        torch.manual_seed(0)
        model = torch.nn.Linear(4, 4)
        opt = torch.optim.Adam(model.parameters(), lr=1e-2)
        cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_clipping": 1.0,
               "zero_optimization": {"stage": stage}}
        e = initialize_engine(model, opt, cfg)
        use_safe_loading(e)
        return e
    e = engine()
    e.backward(e(torch.ones(2, 4)).sum()); e.step()
    e.save_checkpoint(workdir, tag="state", client_state={"frame": {"epoch": 3}})
    trained = {k: v.clone() for k, v in e.module.state_dict().items()}
    out = {"shm_op": deepspeed.comm.comm.cdb.shm_comm_op is None}  # never built
    fresh = engine()
    _, client = fresh.load_checkpoint(workdir, tag="state")
    out["round_trip"] = all(torch.equal(fresh.module.state_dict()[k], v)
                            for k, v in trained.items()) and client["frame"] == {"epoch": 3}
    for f in sorted(glob.glob(f"{workdir}/state/*.pt")):
        name = os.path.basename(f)
        saved = open(f, "rb").read()
        plant(f, f"{workdir}/pwned-{name}")
        try:
            engine().load_checkpoint(workdir, tag="state")
            out[name] = "loaded"
        except UnsafeCheckpointError as exc:
            out[name] = str(exc)
        open(f, "wb").write(saved)
    print(json.dumps(out))
""")


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_checkpoints_round_trip_and_planted_states_are_refused(tmp_path, stage):
    env = dict(os.environ, PYTHONPATH=os.getcwd())
    run = subprocess.run([sys.executable, "-c", ENGINE, str(stage), str(tmp_path),
                          os.path.dirname(__file__)], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out.pop("round_trip") is True
    assert out.pop("shm_op") is True  # initialize_engine: DeepSpeed's inference op not built
    expected = {"mp_rank_00_model_states.pt"} | (
        {"zero_pp_rank_0_mp_rank_00_optim_states.pt"} if stage else set())
    assert set(out) == expected
    for name, message in out.items():
        assert message.startswith(f"{tmp_path}/state/{name}: refused to load"), message
    assert not [f for f in os.listdir(tmp_path) if f.startswith("pwned")]


def test_planted_model_pt_and_best_weights_are_refused_by_their_readers(tmp_path):
    from feature_store.store import Store
    from frame_dist.train.artifacts import BEST_FILE, Checkpoint, SavedModel, run_dir, run_path

    store = Store(str(tmp_path / "store"))
    marker = tmp_path / "pwned"
    os.makedirs(store.path(run_dir("r")))
    plant(store.path(run_path("r", "model.pt")), str(marker))
    with pytest.raises(UnsafeCheckpointError, match=f"{tmp_path}/store/runs/r/model.pt: refused"):
        SavedModel.read(store, "r")
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    plant(str(ckpt / BEST_FILE), str(marker))
    with pytest.raises(UnsafeCheckpointError, match=f"{ckpt}/{BEST_FILE}: refused"):
        Checkpoint.read(str(ckpt), {"frame": {}})
    assert not marker.exists()

"""The training-memory estimate (chatlora.train.memory): against peaks measured on an H200, the runs
it declines, the fit warning, and the studio's estimate route."""

import pytest

from chatlora.config import load_config
from chatlora.train import memory
from chatlora.train.memory import MemoryEstimate, ModelShape, advice, estimate, estimate_run, largest_pass
from chatlora.train.packed_row import PassShape

INDEX = dict(model_type="llama", hidden_size=2048, intermediate_size=5888, num_hidden_layers=36,
             num_attention_heads=16, num_key_value_heads=16, vocab_size=65029)
QWEN3 = dict(model_type="qwen3", hidden_size=2048, intermediate_size=6144, num_hidden_layers=28,
             num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)
QWEN25 = dict(model_type="qwen2", hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
              num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True)
LLAMA32 = dict(model_type="llama", hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

# Peaks `bench/train_speed.py` measured on the H200 (torch.cuda.max_memory_allocated, bench/results/
# 2026-11-30-h200-train-*.json) and the largest pass of each run's steps (bench/memory_estimate.py).
MEASURED = [  # shape, lowmem (checkpointing), 4-bit base, largest pass (tokens, supervised), measured GiB
    (INDEX, False, False, (1280, 640), 7.32),
    (INDEX, True, False, (1024, 512), 4.58),
    (INDEX, False, False, (4096, 2048), 13.88),     # 64 examples per pass
    (INDEX, False, True, (1280, 640), 4.72),
    (INDEX, True, True, (1024, 512), 1.98),
    (QWEN3, False, False, (1408, 704), 6.37),
    (QWEN25, False, False, (1408, 704), 5.92),
    (LLAMA32, False, False, (2048, 1024), 4.94),
]


@pytest.mark.parametrize("shape, lowmem, nf4, largest, measured", MEASURED)
def test_the_estimate_is_within_five_percent_of_the_measured_peaks(shape, lowmem, nf4, largest, measured):
    got = estimate(ModelShape.from_config(shape), dtype="bfloat16", rank=8, targets=TARGETS,
                   checkpoint=lowmem, largest=PassShape(*largest, 32), nf4=nf4)
    assert abs(got.total / memory.GIB / measured - 1) < 0.05, (got.as_json(), measured)


def test_each_part_moves_with_what_drives_it():
    shape = ModelShape.from_config(QWEN3)
    base = dict(dtype="bfloat16", rank=8, targets=TARGETS, checkpoint=False)
    small, large = (estimate(shape, **base, largest=PassShape(t, t // 2, 32)) for t in (512, 1024))
    assert large.activations > 1.9 * small.activations and large.head > 1.5 * small.head
    assert large.weights == small.weights == shape.parameters * 2
    assert shape.parameters == pytest.approx(1.72e9, rel=0.01)   # Qwen3-1.7B: 1.7B with tied embeddings
    fewer = estimate(shape, **dict(base, targets=["q_proj", "v_proj"]), largest=PassShape(1024, 512, 32))
    assert fewer.adapters < large.adapters / 3 and fewer.activations < large.activations
    checkpointed = estimate(shape, **dict(base, checkpoint=True), largest=PassShape(1024, 512, 32))
    assert checkpointed.activations < large.activations / 5 and checkpointed.head == large.head
    wide = estimate(shape, **dict(base, dtype="float32"), largest=PassShape(1024, 512, 32))
    assert wide.weights == 2 * large.weights


def test_a_4bit_base_counts_its_projections_at_nf4s_size():
    """NF4 projections: 0.5 byte per weight plus one 8-bit scale per 64, the embeddings and head in
    bf16, and one fused projection (Qwen3's gate/up: 2 x 6144 x 2048) de-quantised at a time."""
    shape = ModelShape.from_config(QWEN3)
    settings = dict(dtype="bfloat16", rank=8, targets=TARGETS, checkpoint=False,
                    largest=PassShape(1024, 512, 32))
    full, nf4 = estimate(shape, **settings), estimate(shape, **settings, nf4=True)
    projections = 28 * (2048 * (2048 + 2 * 1024) + 2048 * 2048 + 3 * 2048 * 6144)
    assert full.weights - nf4.weights == pytest.approx(projections * (2 - 0.515625) - 2 * 6144 * 2048 * 2, abs=8)
    assert (nf4.adapters, nf4.activations, nf4.head) == (full.adapters, full.activations, full.head)
    assert nf4.weights / memory.GIB == pytest.approx(1.30, abs=0.01)   # of 3.20 GiB in bf16


def test_the_largest_pass_follows_the_step_plan(index_dir, index_tok, huanhuan_rows):
    from helpers import examples_for

    from chatlora.train.packed_row import pass_shape
    from chatlora.train.steps import StepPlan, micro_batches

    examples = examples_for(index_tok, huanhuan_rows[:40])
    cfg = load_config(overrides=["train.examples_per_step=8", "train.micro_batch_examples=4",
                                 "train.micro_batch_tokens=400", "train.max_steps=7"])
    plan = StepPlan(len(examples), 8, cfg.train.seed)
    seen = [pass_shape(c) for step in range(7)
            for c in micro_batches([examples[i] for i in plan.indices(step)], 4, 400)]
    got = largest_pass(examples, cfg.train)
    assert got in seen and got.tokens == max(s.tokens for s in seen)
    assert largest_pass(examples, cfg.train, steps=1).tokens <= got.tokens


def test_runs_the_fused_pass_does_not_take_are_not_estimated():
    model = dict(INDEX)
    plain = load_config(overrides=["train.fast_path=plain"])
    assert "plain peft path" in estimate_run(plain, model, [])
    assert "gemma2" in estimate_run(load_config(), dict(model, model_type="gemma2"), [])
    assert "DoRA" in estimate_run(load_config(overrides=["lora.dora=true"]), model, [])
    assert "no training examples" in estimate_run(load_config(), model, [])


def test_the_warning_says_what_to_change():
    def need(gib):
        return MemoryEstimate(weights=int(gib * memory.GIB), adapters=0, activations=0, head=0,
                              largest_pass=PassShape(1024, 512, 32))

    card = 24 * memory.GIB
    assert advice(need(20), "RTX 4090", card, card) is None
    too_big = advice(need(30), "RTX 4090", card, card, lowmem=need(10))
    assert "more than the RTX 4090's 24.0 GiB" in too_big and "lowmem preset needs about 10.0 GiB" in too_big
    neither = advice(need(30), "RTX 4090", card, card, lowmem=need(25))
    assert "micro_batch_tokens" in neither and "lowmem preset needs" not in neither
    crowded = advice(need(20), "RTX 4090", card, 12 * memory.GIB)
    assert "other processes leave only 12.0 GiB" in crowded
    edge = 24 * memory.GIB - memory.CONTEXT_BYTES   # the context and the margin count
    assert advice(need(edge / memory.GIB), "RTX 4090", card, card) is not None


def test_the_studio_estimates_a_run_and_warns_on_a_small_card(tmp_path, index_dir, tiny_data, monkeypatch):
    from fastapi.testclient import TestClient

    from chatlora.studio import app as studio_app
    from chatlora.studio.runs import RunsDir

    c = TestClient(studio_app.build_app(RunsDir(tmp_path / "runs")), base_url="http://127.0.0.1")
    config = {"model.path": str(index_dir), "data.path": str(tiny_data)}
    monkeypatch.setattr(studio_app, "gpu_memory", lambda: None)
    r = c.post("/api/estimate", json={"config": config}).json()
    assert r["ok"] and r["gpu"] is None and r["warning"] is None
    e = r["estimate"]
    assert e["total"] == pytest.approx(e["weights"] + e["adapters"] + e["activations"] + e["head"], abs=0.02)
    assert r["lowmem"]["total"] <= e["total"] and e["largest_pass"]["tokens"] > 0   # GiB: a tiny model's round alike
    lowmem = c.post("/api/estimate", json={"config": config, "preset": "lowmem"}).json()
    assert lowmem["lowmem"] is None and lowmem["estimate"]["total"] == r["lowmem"]["total"]
    asked = []   # the form's 4-bit base reaches the estimate (a tiny model's GiB round to 0)
    monkeypatch.setattr(memory, "estimate", lambda *a, **kw: asked.append(kw["nf4"]) or estimate(*a, **kw))
    c.post("/api/estimate", json={"config": dict(config, **{"model.quantize": "nf4"})})
    assert asked[0] is True
    tiny_card = {"name": "Tiny GPU", "total_bytes": 2 ** 20, "free_bytes": 2 ** 20}
    monkeypatch.setattr(studio_app, "gpu_memory", lambda: tiny_card)
    warned = c.post("/api/estimate", json={"config": config}).json()
    assert "more than the Tiny GPU's" in warned["warning"]
    plain = c.post("/api/estimate", json={"config": dict(config, **{"train.fast_path": "plain"})}).json()
    assert plain["estimate"] is None and "plain" in plain["reason"]
    bad = c.post("/api/estimate", json={"config": {"train.micro_batch_tokens": "many"}})
    assert bad.status_code == 400 and "micro_batch_tokens" in bad.json()["error"]["message"]
    missing = c.post("/api/estimate", json={"config": dict(config, **{"data.path": str(tmp_path / "none.json")})})
    assert missing.json()["ok"] is False and "none.json" in missing.json()["error"]

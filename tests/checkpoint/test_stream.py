"""kanc.convert_checkpoint: a save_pretrained folder converted layer by layer, checked against the original."""

import errno
import json
import math
import os
import threading

import pytest
import torch
from conftest import ids, save, zoo

import kanc
import kanc.testing
from kanc.checkpoint import compare_checkpoints, meta, stream
from kanc.checkpoint.shards import INDEX_FILE, CheckpointReader
from kanc.errors import KancError


def _logits(model, x):
    return model(input_ids=x).logits


def test_llama_streams_into_shards_and_reloads_converted(llama_dir, tmp_path):
    src, original = llama_dir
    out = tmp_path / "out"
    report = kanc.convert_checkpoint(src, out, "grkan", max_shard_size="40KB")
    assert report.blocks == [f"model.layers.{i}.mlp" for i in range(3)]
    # each layer's attention ran on its calibration inputs: examined, so neither skipped nor listed as not traced
    assert report.skipped == [] and report.not_traced == {}
    assert "discovery_inputs" not in report.options  # a layer's keyword inputs: kanc.load would run the model on them
    assert set(report.fidelity["layers"]) == {f"model.layers.{i}" for i in range(3)}
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    assert len(set(index.values())) > 1 and all((out / f).is_file() for f in index.values())
    assert {"config.json", "generation_config.json", "kanc.json"} <= {p.name for p in out.iterdir()}
    back = kanc.load(out)
    assert type(back.model.layers[0].mlp.act_fn).__name__ == "GroupRational"
    x = ids(5)
    with torch.no_grad():
        expected, got = _logits(original, x), _logits(back, x)
    assert torch.isfinite(got).all() and kanc.testing.rel_error(got, expected) < 1e-3
    back.train()
    loss = _logits(back, x).float().square().mean()
    loss.backward()
    grads = [p.grad for n, p in back.named_parameters() if "act_fn" in n]
    assert len(grads) == 6 and all(g is not None and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)


def test_recorded_layer_errors_match_a_check_of_the_written_files(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "out"
    report = kanc.convert_checkpoint(src, out, "grkan")
    checked = compare_checkpoints(src, out)
    recorded = json.loads((out / "kanc.json").read_text())["stream"]["layers"]
    assert [r["name"] for r in recorded] == [c["name"] for c in checked["layers"]]
    for rec, chk in zip(recorded, checked["layers"]):
        assert rec["error"] == pytest.approx(chk["layer_error"], rel=1e-6) and 0 < chk["layer_error"] < 1e-3
        assert 0 < chk["drift"] < 1e-3 and rec["drift"] == pytest.approx(chk["drift"], rel=1e-5)
        assert set(rec["errors"]) == {"no_grad", "grad"} and rec["error"] == max(rec["errors"].values())
    assert report.fidelity["layers"]["model.layers.0"] == recorded[0]["error"]
    streamed = report.fidelity["streamed"]
    assert streamed["final_drift"] == {"after": "model.layers.2", "error": recorded[-1]["drift"]}
    worst = max(recorded, key=lambda r: r["errors"]["grad"])
    assert streamed["worst_layer"]["grad"] == {"layer": worst["name"], "error": worst["errors"]["grad"]}
    text = str(report)  # says what was measured, not "model outputs: not measured"
    assert "not measured" not in text and "each of the 3 layers checked against the original layer" in text
    assert f"{worst['errors']['grad']:.2e} in {worst['name']} (grad)" in text
    assert "hidden states after the last layer (model.layers.2)" in text and f"{recorded[-1]['drift']:.2e}" in text
    assert all(c["error"] is not None and "calibration inputs" in c["error_inputs"] for c in report.converted)
    assert checked["outside_tensors"] == 3 and checked["outside_different"] == []


@pytest.mark.parametrize("target", ["grkan", "snnk"])
def test_propagating_the_original_equals_converting_the_whole_model(gpt2_dir, tmp_path, target):
    """Layer by layer on the original hidden states gives kanc.compile's result on the whole model, bit for bit."""
    src, original = gpt2_dir
    kanc.convert_checkpoint(src, tmp_path / "out", target, propagate="original")
    streamed = kanc.load(tmp_path / "out")
    whole = kanc.compile(original, target, calibration={"input_ids": ids(), "use_cache": False}, verify=False)
    a, b = whole.state_dict(), streamed.state_dict()
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert streamed.lm_head.weight is streamed.transformer.wte.weight  # the tie survives


def test_propagating_the_converted_outputs_changes_later_layers_only(gpt2_dir, tmp_path):
    src, _ = gpt2_dir
    kanc.convert_checkpoint(src, tmp_path / "orig", "grkan", propagate="original")
    kanc.convert_checkpoint(src, tmp_path / "conv", "grkan")
    a, b = kanc.load(tmp_path / "orig").state_dict(), kanc.load(tmp_path / "conv").state_dict()
    rational = [k for k in a if k.endswith("rational.numerator")]
    first = [k for k in rational if ".h.0." in k]
    assert first and all(torch.equal(a[k], b[k]) for k in first)
    assert any(not torch.equal(a[k], b[k]) for k in rational if ".h.1." in k)


def test_untouched_tensors_are_copied_bit_for_bit(gpt2_dir, tmp_path):
    src, _ = gpt2_dir
    kanc.convert_checkpoint(src, tmp_path / "out", "snnk")
    before, after = CheckpointReader(src), CheckpointReader(tmp_path / "out")
    outside = [k for k in before.keys() if not k.startswith("transformer.h.")]
    assert sorted(outside) == [
        "transformer.ln_f.bias",
        "transformer.ln_f.weight",
        "transformer.wpe.weight",
        "transformer.wte.weight",
    ]
    a, b = before.read(outside), after.read(outside)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in outside)
    assert "lm_head.weight" not in after.keys()  # tied: saved once, as save_pretrained does


def test_bf16_checkpoints_keep_their_dtypes(tmp_path):
    torch.manual_seed(2)
    model = zoo.llama(layers=2).to(torch.bfloat16).eval()
    src = save(model, tmp_path / "src")
    report = kanc.convert_checkpoint(src, tmp_path / "out", "grkan")
    assert all(0 < e < 3e-2 for e in report.fidelity["layers"].values())
    reader = CheckpointReader(tmp_path / "out")
    dtypes = {k: reader.dtypes[k] for k in reader.keys()}
    assert {d for k, d in dtypes.items() if "act_fn" not in k} == {"BF16"}
    assert {d for k, d in dtypes.items() if "act_fn" in k} == {"F32"}  # rationals are stored in fp32, as compile does


def test_one_layer_is_held_at_a_time_and_reads_never_span_layers(llama_dir, tmp_path, monkeypatch):
    src, _ = llama_dir
    built, reads, held = [], [], []
    empty_model, read, convert = meta.empty_model, CheckpointReader.read, stream.run_pipeline
    monkeypatch.setattr(meta, "empty_model", lambda *a: built.append(empty_model(*a)) or built[-1])
    monkeypatch.setattr(CheckpointReader, "read", lambda self, names: reads.append(list(names)) or read(self, names))

    def counting_convert(layer, *args, **kwargs):
        layers = built[0].model.layers
        held.append(sum(any(not p.is_meta for p in m.parameters()) for m in layers))
        return convert(layer, *args, **kwargs)

    monkeypatch.setattr(stream, "run_pipeline", counting_convert)
    kanc.convert_checkpoint(src, tmp_path / "out", "grkan")
    assert held == [1, 1, 1]
    layer_reads = [names for names in reads if names[0].startswith("model.layers.")]
    assert len(layer_reads) == 3
    for i, names in enumerate(layer_reads):
        assert all(n.startswith(f"model.layers.{i}.") for n in names) and len(names) == 9
    assert sorted(reads[0]) == ["lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"]


# ---- refusals: one line, nothing written --------------------------------------------------------------------


def _left(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_an_existing_output_is_replaced_only_with_force_and_only_when_kanc_wrote_it(llama_dir, tmp_path):
    src, _ = llama_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for force in (False, True):  # a folder of the user's: never replaced
        with pytest.raises(KancError, match="is a folder kanc did not write"):
            kanc.convert_checkpoint(src, out, force=force)
    assert (out / "keep.txt").read_text() == "mine"
    (out / "keep.txt").unlink()
    kanc.convert_checkpoint(src, out)  # an empty folder: nothing to lose
    first = (out / "kanc.json").read_bytes()
    with pytest.raises(KancError, match="exists: pass --force to replace it"):
        kanc.convert_checkpoint(src, out, "snnk")
    assert (out / "kanc.json").read_bytes() == first
    kanc.convert_checkpoint(src, out, "snnk", force=True)
    assert json.loads((out / "kanc.json").read_text())["target"] == "snnk"
    assert _left(tmp_path) == ["out"]  # no temporary, no lock
    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask


@pytest.mark.parametrize("where", ["same", "inside", "parent"])
def test_the_input_folder_is_never_the_output(llama_dir, tmp_path, where):
    src, _ = llama_dir
    copy = tmp_path / "a" / "src"
    copy.mkdir(parents=True)
    for f in src.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    (copy / "kanc.json").write_text("{}")  # even a folder that looks like kanc's
    out = {"same": copy, "inside": copy / "out", "parent": tmp_path / "a"}[where]
    before = sorted(p.name for p in copy.iterdir())
    with pytest.raises(KancError, match="refusing to write .*: it (is|is inside|holds) the input"):
        kanc.convert_checkpoint(copy, out, force=True)
    assert sorted(p.name for p in copy.iterdir()) == before


def test_a_failure_while_finishing_the_folder_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    src, _ = llama_dir

    def full_disk(src, tmp):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(stream, "_copy_extras", full_disk)  # every shard is written by then
    with pytest.raises(KancError, match=r"^cannot write .*out: no space left on the device"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == []


def _copy_src(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_a_truncated_shard_fails_and_leaves_nothing(llama_dir, tmp_path):
    src = _copy_src(llama_dir[0], tmp_path / "src")
    shard = sorted(src.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(KancError, match="truncated or corrupt|not a safetensors"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == ["src"]


def _edit_index(src, change):
    index = json.loads((src / INDEX_FILE).read_text())
    change(index["weight_map"])
    (src / INDEX_FILE).write_text(json.dumps(index))


def test_an_index_pointing_outside_the_folder_is_refused(llama_dir, tmp_path):
    src = _copy_src(llama_dir[0], tmp_path / "src")
    _edit_index(src, lambda weight_map: weight_map.update({"model.norm.weight": "../secret.safetensors"}))
    with pytest.raises(KancError, match="names a shard outside the folder"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == ["src"]


def test_a_missing_tensor_is_named_before_anything_is_written(llama_dir, tmp_path):
    src = _copy_src(llama_dir[0], tmp_path / "src")
    _edit_index(src, lambda weight_map: weight_map.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(KancError, match=r"no tensor for model.layers.2.mlp.up_proj.weight"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == ["src"]


def test_non_finite_weights_fail_the_layer_check(tmp_path):
    torch.manual_seed(3)
    model = zoo.llama(layers=2).eval()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    src = save(model, tmp_path / "src")
    with pytest.raises(KancError, match="layer model.layers.1 gives non-finite outputs"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == ["src"]


@pytest.mark.parametrize(("change", "failure"), [(float("nan"), "not in the converted model \\(grad\\)"),
                                                 (1.5, "differs between no_grad and grad mode")])  # fmt: skip
def test_a_layer_that_goes_wrong_only_with_grad_fails_the_check(llama_dir, tmp_path, monkeypatch, change, failure):
    """Each layer is checked in grad mode too: a converted MLP that is non-finite, or different, only when grad is
    enabled (what a fused path that autograd bypasses would do) ends the run with nothing written."""
    src, _ = llama_dir
    real = stream.run_pipeline

    def with_grad_only_change(layer, *args, **kwargs):
        conv = real(layer, *args, **kwargs)
        layer.mlp.register_forward_hook(lambda m, a, out: out * change if torch.is_grad_enabled() else None)
        return conv

    monkeypatch.setattr(stream, "run_pipeline", with_grad_only_change)
    with pytest.raises(KancError, match=f"layer model.layers.0: output .*{failure}"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == []


def test_a_failure_in_a_later_layer_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    src, _ = llama_dir
    calls = []

    def failing(layer, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KancError("boom")
        return stream.__dict__["_real_convert"](layer, *args, **kwargs)

    monkeypatch.setitem(stream.__dict__, "_real_convert", stream.run_pipeline)
    monkeypatch.setattr(stream, "run_pipeline", failing)
    with pytest.raises(KancError, match="boom"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == []


def test_bad_options_fail_before_any_work(llama_dir, tmp_path):
    src, _ = llama_dir
    with pytest.raises(KancError, match="unknown option 'colour'"):
        kanc.convert_checkpoint(src, tmp_path / "out", colour=1)
    with pytest.raises(KancError, match="propagate must be one of"):
        kanc.convert_checkpoint(src, tmp_path / "out", propagate="both")
    with pytest.raises(KancError, match="bad size"):
        kanc.convert_checkpoint(src, tmp_path / "out", max_shard_size="lots")
    assert _left(tmp_path) == []


def test_folders_without_safetensors_weights_are_refused(tmp_path):
    model = zoo.llama(layers=1)
    model.config.save_pretrained(tmp_path / "bin")
    torch.save(model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    with pytest.raises(KancError, match="re-save the model with save_pretrained"):
        kanc.convert_checkpoint(tmp_path / "bin", tmp_path / "out")
    with pytest.raises(KancError, match="not a save_pretrained folder"):
        kanc.convert_checkpoint(tmp_path / "nothing", tmp_path / "out")


def test_layers_that_share_weights_cannot_be_streamed(tmp_path):
    import transformers

    cfg = transformers.AlbertConfig(
        num_hidden_layers=3, hidden_size=64, embedding_size=32, intermediate_size=128, num_attention_heads=2,
        vocab_size=100, max_position_embeddings=64,
    )  # fmt: skip
    src = save(transformers.AlbertForMaskedLM(cfg).eval(), tmp_path / "src")
    with pytest.raises(KancError, match="runs twice in one forward"):
        kanc.convert_checkpoint(src, tmp_path / "out")
    assert _left(tmp_path) == ["src"]


# ---- the walk on a plain torch model: root replaced by the conversion, the fit that never runs the layer -------


class _Layer(torch.nn.Module):
    """A layer that traces whole, its activation a function: GR-KAN rewrites its own graph (the root is replaced)."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(x)))


class _Net(torch.nn.Module):
    def __init__(self, d: int = 16, n: int = 3) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(_Layer(d) for _ in range(n))
        self.head = torch.nn.Linear(d, 4)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def _stream_plain(tmp_path, monkeypatch_compile=None):
    from kanc.checkpoint.shards import ShardWriter

    torch.manual_seed(4)
    net = _Net().eval()
    writer = ShardWriter(tmp_path / "src", "2KB")
    (tmp_path / "src").mkdir()
    for k, v in net.state_dict().items():
        writer.add(k, v)
    writer.finish()
    with meta.meta_parameters():
        empty = _Net().eval()
    run = stream._Stream(empty, CheckpointReader(tmp_path / "src"), "grkan", {}, "converted", None)
    (tmp_path / "out").mkdir()
    out = ShardWriter(tmp_path / "out")
    x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(0))
    run.execute(out, x)
    out.finish()
    return net, run, x


def test_a_layer_whose_root_the_conversion_replaces_is_run_as_converted(tmp_path):
    net, run, _ = _stream_plain(tmp_path)
    assert {(c["mode"], c["owner"]) for c in run.report.converted} == {("graph", f"layers.{i}") for i in range(3)}
    assert len(run.records) == 3 and all(0 < r.error < 1e-2 for r in run.records)
    reader = CheckpointReader(tmp_path / "out")
    converted = [kanc.compile(layer, "grkan", verify=False) for layer in net.layers]  # the same structure
    names = {f"layers.{i}.{k}" for i, layer in enumerate(converted) for k in layer.state_dict()}
    assert set(reader.keys()) == names | {"head.weight", "head.bias"}
    assert torch.equal(reader.read(["head.weight"])["head.weight"], net.head.weight)


def test_when_the_fit_never_runs_the_layer_the_original_is_read_again(tmp_path, monkeypatch):
    """Without the fit's forward to catch, the original layer's output comes from a fresh read of the checkpoint:
    the recorded errors are those of the converted layers against the original ones on the same inputs."""
    real = stream.run_pipeline
    monkeypatch.setattr(stream, "run_pipeline", lambda layer, *a, calibration, **k: real(layer, *a, **k))
    net, run, x = _stream_plain(tmp_path)
    h = x
    for rec, layer in zip(run.records, net.layers):
        converted = kanc.compile(layer, "grkan", verify=False)  # synthetic rows, as in the run: the same layer
        with torch.no_grad():
            want, got = layer(h), converted(h)
        assert rec.error == pytest.approx(kanc.testing.rel_error(got, want), rel=1e-6) and rec.error > 0
        h = got


def test_a_streamed_folder_fine_tunes_with_plain_pytorch_and_saves_back_converted(gpt2_dir, tmp_path):
    """The README's round trip: convert_checkpoint -> kanc.load -> a few optimizer steps -> kanc.save -> kanc.load."""
    src, _ = gpt2_dir
    kanc.convert_checkpoint(src, tmp_path / "out", "grkan")
    model = kanc.load(tmp_path / "out").train()
    rationals = {n: p.detach().clone() for n, p in model.named_parameters() if n.endswith(("numerator", "denominator"))}
    assert rationals
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = ids(3)
    losses = []
    for _ in range(3):
        loss = model(input_ids=x, labels=x).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses) and losses[-1] < losses[0]
    moved = [n for n, p in model.named_parameters() if n in rationals and not torch.equal(p, rationals[n])]
    assert moved == list(rationals)  # the rational coefficients train too
    kanc.save(model, tmp_path / "tuned")
    back = kanc.load(tmp_path / "tuned").eval()
    model.eval()
    with torch.no_grad():
        assert torch.equal(back(input_ids=x).logits, model(input_ids=x).logits)
    assert json.loads((tmp_path / "tuned" / "kanc.json").read_text())["blocks"] == kanc.report(model).blocks


def test_a_full_disk_met_by_the_background_writes_leaves_nothing(llama_dir, tmp_path, monkeypatch):
    from kanc.checkpoint.shards import ShardWriter

    real_open = ShardWriter._open_file

    def full_disk(data):
        raise OSError(errno.ENOSPC, "No space left on device")

    def failing_open(self, path):
        real_open(self, path)
        if path.name.startswith("model-00003."):  # a layer's tensors, the conversion under way
            monkeypatch.setattr(self._file, "write", full_disk)

    monkeypatch.setattr(ShardWriter, "_open_file", failing_open)
    with pytest.raises(KancError, match=r"^cannot write .*out: no space left on the device"):
        kanc.convert_checkpoint(llama_dir[0], tmp_path / "out", max_shard_size="40KB")
    assert _left(tmp_path) == []


def test_a_layer_that_is_itself_the_block_streams_and_reloads(tmp_path):
    """BERT's MLP spans the layer (intermediate + output, the `split` pattern): the block is the layer itself, named
    by the layer's own name (not `encoder.layer.0.<root>`, which kanc.load could not find), and the folder reloads
    converted and matches the original with a padding mask."""
    torch.manual_seed(3)
    original = zoo.bert(layers=2).eval()
    src = save(original, tmp_path / "src")
    report = kanc.convert_checkpoint(src, tmp_path / "out", "grkan")
    assert report.blocks == ["encoder.layer.0", "encoder.layer.1"]
    back = kanc.load(tmp_path / "out").eval()
    assert [c["name"] for c in kanc.report(back).converted] == report.blocks
    x, mask = ids(7), torch.ones(2, 16, dtype=torch.long)
    mask[0, 9:] = 0
    with torch.no_grad():
        want = original(input_ids=x, attention_mask=mask).last_hidden_state
        got = back(input_ids=x, attention_mask=mask).last_hidden_state
    assert torch.isfinite(got).all() and 0 < kanc.testing.rel_error(got, want) < 1e-3
    layers = compare_checkpoints(src, tmp_path / "out")["layers"]  # rebuilds each converted layer from the manifest
    assert [r["name"] for r in layers] == report.blocks and all(0 < r["layer_error"] < 1e-3 for r in layers)


def test_an_encoder_decoder_measures_the_drift_per_layer_list(tmp_path):
    """T5 streams its encoder, then its decoder. The decoder's first layer takes the decoder's embeddings, so the
    original model's hidden states are carried per layer list: carried across, the decoder's "drift" compared it with
    the encoder's states (0.77 on this model, while the converted logits differ by under 1e-2)."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    cfg = transformers.T5Config(vocab_size=100, d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
                                d_kv=8, decoder_start_token_id=0)  # fmt: skip
    original = transformers.T5ForConditionalGeneration(cfg).eval()
    src = save(original, tmp_path / "src")
    report = kanc.convert_checkpoint(src, tmp_path / "out", "grkan")
    drift = report.fidelity["streamed"]["stack_drift"]
    assert list(drift) == ["encoder.block", "decoder.block"]
    recorded = {r["name"]: r["drift"] for r in compare_checkpoints(src, tmp_path / "out")["layers"]}
    assert {s: d["error"] for s, d in drift.items()} == {
        "encoder.block": recorded["encoder.block.1"],
        "decoder.block": recorded["decoder.block.1"],
    }
    back = kanc.load(tmp_path / "out").eval()
    x, y = ids(8), ids(9)
    with torch.no_grad():
        want = original(input_ids=x, decoder_input_ids=y).logits
        got = back(input_ids=x, decoder_input_ids=y).logits
    error = kanc.testing.rel_error(got, want)
    assert torch.isfinite(got).all() and 0 < error < 5e-2
    assert all(0 < d["error"] < 5e-2 for d in drift.values())
    assert any("decoder.block.0" in line and "encoder.block's states" in line for line in report.fidelity["summary"])


_RUN_ASIDE = stream.LayerWalk.run_aside


def _streamed(src, out, monkeypatch, aside: bool):
    monkeypatch.setattr(stream, "_spare_core", lambda: aside)
    threads = set()

    def run_aside(self, module, inputs):
        threads.add(threading.current_thread().name)
        return _RUN_ASIDE(self, module, inputs)

    monkeypatch.setattr(stream.LayerWalk, "run_aside", run_aside)
    kanc.convert_checkpoint(src, out, "grkan")
    manifest = json.loads((out / "kanc.json").read_text())["stream"]["layers"]
    tensors = CheckpointReader(out)
    return {r["name"]: (r["drift"], r["errors"]) for r in manifest}, tensors.read(tensors.keys()), threads


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_drift_on_its_own_thread_gives_what_it_gives_inline(tmp_path, monkeypatch, dtype):
    """With a spare core the drift's forward runs on a thread beside the conversion, on a twin of the layer that
    shares its tensors; every recorded error and drift and every written tensor is the inline run's, bit for bit,
    and the layers the twin borrowed from are left as they were (the template gets its meta tensors back)."""
    torch.manual_seed(3)
    src = save(zoo.llama(layers=3).eval().to(dtype), tmp_path / "src")
    inline = _streamed(src, tmp_path / "inline", monkeypatch, aside=False)
    aside = _streamed(src, tmp_path / "aside", monkeypatch, aside=True)
    assert inline[2] == set() and aside[2] == {"kanc-drift_0"}  # layers 1 and 2 ran their drift on the thread
    assert aside[0] == inline[0] and all(d is not None and 0 < d < 0.05 for d, _ in aside[0].values() if d)
    assert aside[1].keys() == inline[1].keys()
    assert all(torch.equal(aside[1][k], inline[1][k]) for k in inline[1])


def test_a_failing_drift_on_its_thread_fails_the_run_as_inline(tmp_path, monkeypatch):
    """The model's own error in the drift's forward (its thread) ends the run with the walk's one line; a
    conversion error raised meanwhile would win, and the thread is waited for either way."""
    torch.manual_seed(3)
    src = save(zoo.llama(layers=3).eval(), tmp_path / "src")
    monkeypatch.setattr(stream, "_spare_core", lambda: True)

    def broken(self, module, inputs):
        raise RuntimeError("shape mismatch in the drift")

    monkeypatch.setattr(stream.LayerWalk, "run_aside", broken)
    with pytest.raises(KancError, match="does not run on the calibration inputs: RuntimeError: shape mismatch"):
        kanc.convert_checkpoint(src, tmp_path / "out", "grkan")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("model", "dtype"), [("llama", torch.float32), ("llama", torch.bfloat16),
                                              ("gpt2", torch.float32)])  # fmt: skip
def test_the_gemm_memo_changes_no_number(tmp_path, monkeypatch, model, dtype):
    """Each layer's repeated GEMMs (the converted layer's attention, a gated block's gate and up projections, a
    block reference's fc1) are recalled from the capture run (kanc.checkpoint.precision.GemmMemo): every written
    tensor and every recorded error and drift is what computing them all again gives, bit for bit."""
    from kanc.checkpoint import precision, walk

    torch.manual_seed(3)
    built = zoo.llama(layers=3) if model == "llama" else zoo.gpt2(layers=3)
    src = save(built.eval().to(dtype), tmp_path / "src")
    memos = []

    def gemms(keep):
        def make():
            memos.append(precision.LayerGemms(memo_bytes=precision.MEMO_BYTES if keep else 0))
            return memos[-1]

        return make

    runs = {}
    for keep in (False, True):
        monkeypatch.setattr(walk, "LayerGemms", gemms(keep))
        out = tmp_path / f"memo-{keep}"
        kanc.convert_checkpoint(src, out, "grkan")
        layers = json.loads((out / "kanc.json").read_text())["stream"]["layers"]
        reader = CheckpointReader(out)
        runs[keep] = ({r["name"]: (r["drift"], r["errors"], r["error"]) for r in layers}, reader.read(reader.keys()))
    assert memos[0].memo.hits == 0 and memos[1].memo.hits > 0
    assert runs[True][0] == runs[False][0]
    assert runs[True][1].keys() == runs[False][1].keys()
    assert all(torch.equal(runs[True][1][k], runs[False][1][k]) for k in runs[False][1])


def test_the_garbage_collector_is_left_as_it_was_found(llama_dir, tmp_path):
    """The conversion freezes what exists (imports, the empty model) out of the collector's full passes and unfreezes
    it at the end, error or not; a process that froze objects of its own keeps them frozen."""
    import gc

    src, _ = llama_dir
    assert gc.get_freeze_count() == 0
    kanc.convert_checkpoint(src, tmp_path / "out")
    assert gc.get_freeze_count() == 0
    with pytest.raises(KancError):
        kanc.convert_checkpoint(src, tmp_path / "bad", calibration={"input_ids": torch.zeros(1, 3)})
    assert gc.get_freeze_count() == 0 and not (tmp_path / "bad").exists()
    gc.freeze()
    try:
        theirs = gc.get_freeze_count()
        kanc.convert_checkpoint(src, tmp_path / "again")
        assert 0.9 * theirs < gc.get_freeze_count() <= theirs  # not unfrozen, nothing added (a few freed)
    finally:
        gc.unfreeze()

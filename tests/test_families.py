"""The decoder families added for issue #10: catalog sizes against the published figures, the
structure read from each config (layer types, q/k norms, nested text configs), and the error for
an architecture the analytic model does not know. Agreement with the traced step is
tests/test_agreement.py."""
import dataclasses
import json

import pytest

from vramplan.core._errors import ModelError
from vramplan.core._models import resolve, spec_from_config

CONFIGS = __import__("pathlib").Path(__file__).parent / "configs"

B = 10 ** 9

# Published sizes (model cards on huggingface.co), in billions, with the digits they were given
# to: the count must round to the published figure, so the tolerance is half a unit of the last
# published digit. (total, non-embedding or None, decimals)
PUBLISHED = [
    ("Qwen/Qwen3-0.6B", 0.6, 0.44, (1, 2)),      # "Number of Parameters: 0.6B, Non-Embedding: 0.44B"
    ("Qwen/Qwen3-8B", 8.2, 6.95, (1, 2)),        # "8.2B, Non-Embedding: 6.95B"
    ("Qwen/Qwen3-32B", 32.8, 31.2, (1, 1)),      # "32.8B, Non-Embedding: 31.2B"
    # Gemma 3 technical report (arXiv 2503.19786) Table 1, text decoder without the vision
    # encoder: non-embedding parameters 698M, 3,209M, 10,759M, 25,600M; gemma-3-1b card: "1B"
    ("google/gemma-3-1b-pt", 1.0, 0.698, (1, 3)),
    ("google/gemma-3-4b-pt", None, 3.209, (None, 3)),
    ("google/gemma-3-12b-pt", None, 10.759, (None, 3)),
    ("google/gemma-3-27b-pt", None, 25.600, (None, 3)),
    # OLMo 2 model card: "OLMo 2-7B" (a whole number of billions)
    ("allenai/OLMo-2-1124-7B", 7, None, (0, None)),
    # microsoft/phi-4 (model_type phi3): the model page's safetensors size, "14.7B params"
    ("microsoft/phi-4", 14.7, None, (1, None)),
    # microsoft/Phi-4-mini-instruct on the Hub: "3.84B params" (safetensors; the lm_head is tied
    # to the embeddings, stored and counted once)
    ("microsoft/Phi-4-mini-instruct", 3.84, None, (2, None)),
    # SmolLM3 model card: "3B"
    ("HuggingFaceTB/SmolLM3-3B-Base", 3, None, (0, None)),
    # Olmo 3 on the Hub: "7.3B params" (safetensors)
    ("allenai/Olmo-3-1025-7B", 7.3, None, (1, None)),
    # Qwen3-30B-A3B model card: "Number of Parameters: 30.5B in total and 3.3B activated; Number of
    # Paramaters (Non-Embedding): 29.9B"
    ("Qwen/Qwen3-30B-A3B", 30.5, 29.9, (1, 1)),

    # ibm-granite/granite-3.3-8b-instruct on the Hub: "8.17B params" (safetensors; the lm_head is
    # tied to the embeddings, so it is stored and counted once)
    ("ibm-granite/granite-3.3-8b-instruct", 8.17, None, (2, None)),

    # Moonlight model card (model_type deepseek_v3): "Total Params 16B"
    ("moonshotai/Moonlight-16B-A3B", 16, None, (0, None)),
    # DeepSeek-V3 model card: "685B ... includes 671B of the Main Model weights and 14B of the
    # Multi-Token Prediction (MTP) Module weights"; DeepseekV3ForCausalLM builds the main model
    ("deepseek-ai/DeepSeek-V3", 671, None, (0, None)),
]


def non_embedding(spec) -> int:
    """The language model's non-embedding parameters (the Gemma 3 report's figures leave out the
    vision encoder a multimodal checkpoint also loads)."""
    parts = spec.param_breakdown()
    return spec.num_params - parts["embed_tokens"] - parts["lm_head"] - parts.get("vision_tower", 0)


@pytest.mark.parametrize("model, total, non_emb, decimals", PUBLISHED, ids=[p[0] for p in PUBLISHED])
def test_param_counts_round_to_the_published_sizes(model, total, non_emb, decimals):
    spec = resolve(model)
    if total is not None:
        assert round(spec.num_params / B, decimals[0]) == total
    if non_emb is not None:
        assert round(non_embedding(spec) / B, decimals[1]) == non_emb


def test_qwen3_has_per_head_qk_norms_and_no_biases():
    spec = resolve("Qwen/Qwen3-8B")
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.hidden) == (32, 8, 128, 4096)
    assert spec.norm_widths == (4096, 4096, 128, 128)
    assert not any(l.bias for l in spec.layer_linears)
    assert set(spec.layer_types) == {"full_attention"} and spec.sliding_window is None


def test_qwen3_sliding_layers_follow_max_window_layers():
    config = dict(resolve("Qwen/Qwen3-0.6B").config, use_sliding_window=True, sliding_window=4096,
                  max_window_layers=20)
    spec = spec_from_config(config, "q", "test")
    assert spec.layer_types == ("full_attention",) * 20 + ("sliding_attention",) * 8
    assert spec.sliding_window == 4096


def test_explicit_layer_types_win_and_are_checked():
    config = dict(resolve("Qwen/Qwen3-0.6B").config, num_hidden_layers=2, sliding_window=64,
                  layer_types=["sliding_attention", "full_attention"])
    assert spec_from_config(config, "q", "test").layer_types == ("sliding_attention", "full_attention")
    with pytest.raises(ModelError) as info:
        spec_from_config(dict(config, layer_types=["linear_attention", "full_attention"]), "q", "test")
    assert "layer_types must list 2 entries of full_attention / sliding_attention" in str(info.value)


def test_unknown_architecture_names_the_families_and_simulate(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"model_type": "bert", "hidden_size": 64}))
    with pytest.raises(ModelError) as info:
        resolve(str(path))
    text = str(info.value)
    assert "architecture 'bert'" in text and "qwen3" in text and "`vramplan simulate`" in text


def test_gemma3_reads_the_text_config_of_multimodal_checkpoints():
    spec = resolve("google/gemma-3-27b-pt")
    assert spec.model_type == "gemma3_text" and spec.config["model_type"] == "gemma3_text"
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.head_dim) == (5376, 62, 32, 16, 128)
    # Gemma3TextConfig defaults fill what text_config omits: vocabulary, tied embeddings
    assert spec.vocab == 262208 and spec.tied


def siglip_params(layers: int, hidden: int, inter: int, patch: int, image: int, text_hidden: int) -> int:
    """SiglipVisionModel without a head, plus Gemma3MultiModalProjector, counted by hand."""
    layer = 4 * (hidden * hidden + hidden) + hidden * inter + inter + inter * hidden + hidden + 4 * hidden
    embeddings = hidden * 3 * patch * patch + hidden + (image // patch) ** 2 * hidden
    return layers * layer + embeddings + 2 * hidden + hidden * text_hidden + hidden


@pytest.mark.parametrize("model, text_hidden, total", [("google/gemma-3-4b-pt", 2560, 4_300_079_472),
                                                       ("google/gemma-3-12b-pt", 3840, 12_187_325_040),
                                                       ("google/gemma-3-27b-pt", 5376, 27_432_406_640)])
def test_gemma3_multimodal_checkpoints_load_their_vision_tower(model, text_hidden, total):
    """transformers 5.23 MODEL_FOR_CAUSAL_LM_MAPPING_NAMES maps "gemma3" to
    Gemma3ForConditionalGeneration: AutoModelForCausalLM.from_pretrained of a multimodal Gemma 3
    checkpoint loads the SigLIP encoder (27 layers, width 1152, 896 px / 14 px patches) and the
    projector too, and the count is every parameter that class builds."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    assert MODEL_FOR_CAUSAL_LM_MAPPING_NAMES["gemma3"] == "Gemma3ForConditionalGeneration"
    spec = resolve(model)
    vision = siglip_params(27, 1152, 4304, 14, 896, text_hidden)
    assert spec.param_breakdown()["vision_tower"] == spec.vision.num_params == vision
    assert spec.num_params == total and round(total / B) == int(model.split("-")[2][:-1])
    with torch.device("meta"):
        built = transformers.AutoModelForCausalLM.from_config(
            transformers.CONFIG_MAPPING["gemma3"].from_dict(catalog_config(model)))
    assert type(built).__name__ == "Gemma3ForConditionalGeneration"
    assert sum(p.numel() for p in built.parameters()) == total
    assert sum(p.numel() for n, p in built.named_parameters()
               if "vision_tower" in n or "multi_modal_projector" in n) == vision
    assert resolve("google/gemma-3-1b-pt").vision is None     # a text-only checkpoint (gemma3_text)


def gemma3_multimodal():
    return spec_from_config(json.loads((CONFIGS / "gemma3-multimodal.json").read_text()), "g3mm", "tests/configs")


@pytest.mark.parametrize("flags, weights, consts, adapters", [
    # nf4 with double quantization, all-linear LoRA rank 16 in float32
    (dict(), 441_856, 36_864, 229_376),
    # LoRA on 16-bit weights: the Linear weights whole in bf16
    (dict(method="lora"), 441_856 - 8 * 8192 - 4 * 16384 + 8 * 32768 + 4 * 65536, 0, 229_376),
    # prepare_model_for_kbit_training: every 16-bit parameter float32 (the tower's Linear4bit
    # biases too: their forward, which would cast them back, never runs): the Conv2d, positions and
    # projector double, each fc1 bias takes a second block
    (dict(prepare_kbit=True), 441_856 + 150_528 + 16_384 + 131_072 + 2 * 512, 36_864, 229_376),
    # named targets reach the tower's q_proj / v_proj by name
    (dict(targets="q_proj,v_proj"), 441_856, 36_864, 2 * 2 * 16_384),
])
def test_gemma3_vision_tower_static_bytes_worked_by_hand(flags, weights, consts, adapters):
    """tests/configs/gemma3-multimodal.json: a SigLIP tower of 2 layers, width 128, MLP 256,
    112 px / 14 px patches (64 positions), projector 128 -> 512. Per layer four 128x128 and two
    128x256 Linear layers packed 4-bit (numel / 2 bytes: 4 x 8192 + 2 x 16384), six bf16 biases
    (one 512-byte block each), two LayerNorms (4 blocks); the Conv2d 128x3x14x14 (150,528 B) and
    its bias (512), positions 64x128 (16,384), post_layernorm (1,024), projector 128x512 (131,072)
    and its norm (512), position_ids int64 (512): 441,856 B. Quantization constants 3,072 B per
    Linear (double quantization: absmax codes, nested absmax, code book, offset, state), 12 of
    them. LoRA A (16, in) and B (out, 16) float32: 16,384 B on each attention projection, 24,576 on
    fc1 and fc2: 229,376 B."""
    from vramplan import TrainSetup
    from vramplan.estimate._inventory import static_memory

    spec = gemma3_multimodal()
    static = static_memory(spec, TrainSetup(seq=512, **flags))
    text = static_memory(dataclasses.replace(spec, vision=None, wrapper=None), TrainSetup(seq=512, **flags))
    assert static.vision == (weights, consts, adapters)
    assert (static.weights - text.weights, static.quant_constants - text.quant_constants,
            static.adapters - text.adapters) == (weights, consts, adapters)
    # the tower never runs in a text-only step: no gradients, no optimizer state for it
    assert (static.gradients, static.optimizer_state) == (text.gradients, text.optimizer_state)


def test_gemma3_multimodal_inventory_line_and_bad_vision_configs(tmp_path, capsys):
    from vramplan import TrainSetup, estimate
    from vramplan.cli import main

    est = estimate(gemma3_multimodal(), TrainSetup(seq=512))
    line = next(a for a in est.assumptions if a.startswith("vision tower and projector"))
    assert "Gemma3ForConditionalGeneration" in line and "weights 441,856 B" in line and "229,376 B" in line
    config = json.loads((CONFIGS / "gemma3-multimodal.json").read_text())
    for field, value, message in [("vision_use_head", True, "vision_use_head true (a SigLIP pooling head)"),
                                  ("model_type", "clip_vision_model", "vision_config must be a SigLIP"),
                                  ("hidden_size", 0, "vision_config.hidden_size must be a positive integer")]:
        (tmp_path / "config.json").write_text(json.dumps(dict(config, vision_config={**config["vision_config"],
                                                                                   field: value})))
        assert main(["estimate", str(tmp_path)]) != 0
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("Error: ") and message in err and "(hint: " in err


def test_gemma3_layer_pattern_and_norms():
    spec = resolve("google/gemma-3-1b-pt")
    assert spec.layer_types[:6] == ("sliding_attention",) * 5 + ("full_attention",)
    assert spec.layer_types.count("full_attention") == 4 and spec.sliding_window == 512
    assert spec.norm_widths == (1152,) * 4 + (256, 256)
    assert spec.kv_heads == 1 and spec.vocab == 262144


def test_gemma3_layer_kinds_split_from_the_window_on():
    from vramplan import TrainSetup
    from vramplan.estimate._ops import layer_stack

    spec = resolve("google/gemma-3-1b-pt")    # sliding_window 512
    short = layer_stack(spec, TrainSetup(seq=511, grad_ckpt=False))
    long = layer_stack(spec, TrainSetup(seq=2048, grad_ckpt=False))
    assert len(set(map(id, short))) == 1
    # at exactly the window the mask is built (_ignore_causal_mask_sdpa: kv_length >= local_size)
    assert len(set(map(id, layer_stack(spec, TrainSetup(seq=512, grad_ckpt=False))))) == 2
    assert len(set(map(id, long))) == 2 and long[5] is long[11] and long[0] is long[4]
    assert long[0].saved > long[5].saved   # the sliding layers keep their mask-bias for backward


@pytest.mark.parametrize("model", ["google/gemma-3-12b-pt", "google/gemma-3-1b-pt"])
def test_masked_attention_s_dk_dv_are_of_every_head(model):
    """With a mask transformers repeats k and v to every head before SDPA, so the kernel's dk / dv
    are the repeated tensors' (repeat_kv's backward sums them down): Gemma-3-12B's sliding layers
    at 4 x 2048 make three 64 MiB gradients there, as simulate's trace does (dv was 32 MiB); with
    one KV head (Gemma-3-1B) the repeat is a stride-0 view, and the gradient still of every head."""
    from vramplan import TrainSetup
    from vramplan.estimate._ops import layer_ops
    from vramplan.estimate._symbolic import B, S

    spec = resolve(model)
    setup = TrainSetup(batch=4, seq=2048, grad_ckpt=False)
    ops, _ = layer_ops(spec, setup)        # a sliding-window layer: the mask, k and v repeated
    sdpa = next(op for op in ops if op.name == "attn.sdpa")
    every_head = 2 * B * S * spec.heads * spec.head_dim     # bf16 (b, s, H, head_dim)
    assert [str(n) for _name, n in sdpa.grads] == [str(every_head)] * 3
    # repeat_kv's backward sums dv down to the KV heads, contiguous as (b, kv, s, d): v's
    # `.view(...).transpose(1, 2)` then copies it, as q's and k's after their norms and RoPE; with
    # one KV head the view folds the size-1 dim and takes it as it is (simulate's trace of
    # Gemma-3-12B QLoRA 4 x 2048 without checkpointing: the streams' allocations of 1 MiB or more
    # share 99.99% in order, 94.9% without v's copy)
    copies = {op.name for op in ops if op.name.endswith(".heads")}
    assert copies == ({"attn.q.heads", "attn.k.heads", "attn.v.heads"} if spec.kv_heads > 1
                      else {"attn.q.heads", "attn.k.heads"})

def test_olmo2_norms_follow_the_blocks_and_span_the_projections():
    spec = resolve("allenai/OLMo-2-1124-7B")
    assert spec.arch.norm_placement == "post"
    assert spec.norm_widths == (4096, 4096, 32 * 128, 32 * 128)
    assert not spec.tied and spec.vocab == 100352


def test_float32_rotary_embeddings_are_cast_back_even_after_a_pass_through_cat(monkeypatch):
    # OLMo 2's float32 cos / sin make both embeddings float32, cast back as apply_rotary_pos_emb
    # returns; a partial-rotary cat (Phi-3's layout) after them promotes to float32 as well, and
    # the cast back must still follow it
    from vramplan.core import _architectures
    from vramplan.core._setup import TrainSetup
    from vramplan.estimate._ops import layer_ops

    spec = resolve("allenai/OLMo-2-1124-7B")
    names = lambda: [op.name for op in layer_ops(spec, TrainSetup(dtype="bf16"))[0]]  # noqa: E731
    plain = names()
    assert plain.index("attn.q.rope") < plain.index("attn.q.rot.cast") < plain.index("attn.rope_return")
    arch = dataclasses.replace(spec.arch, rope_pass_cat=True)
    monkeypatch.setitem(_architectures.ARCHITECTURES, "olmo2", arch)
    assert spec.arch.rope_pass_cat
    passed = names()
    assert passed.index("attn.q.rope_pass") < passed.index("attn.q.rot.cast") < passed.index("attn.rope_return")
    assert "attn.k.rot.cast" in passed
    assert "attn.q.rot.cast" not in [op.name for op in layer_ops(spec, TrainSetup(dtype="fp32"))[0]]


def test_phi4_mini_rotates_three_quarters_of_each_head():
    from vramplan.core._setup import TrainSetup
    from vramplan.estimate._inventory import rope_width
    from vramplan.estimate._ops import layer_ops, rope_tables
    from vramplan.estimate._symbolic import variables

    spec = resolve("phi-4-mini")
    assert spec.model_type == "phi3" and spec.tied and spec.vocab == 200064
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.rotary_dim) == (24, 8, 128, 96)
    assert spec.layer_linears[0].out_features == 24 * 128 + 2 * 8 * 128   # qkv_proj
    assert rope_width(spec) == 96
    setup = TrainSetup(seq=512)
    assert rope_tables(spec, setup) == [512 * 96 * 2] * 2       # bf16 cos and sin of (1, seq, 96)
    ops = {op.name: op for op in layer_ops(spec, setup)[0]}
    # q_rot = q[..., :96] is a slice: a view whose gradient is a zero-filled one of q's size
    assert "attn.q.rot_part.slice" in ops and "attn.k.rot_part.slice" in ops
    assert not ops["attn.q.rot_part.slice"].outputs[0].nbytes
    # q_rot * cos is 96 wide per head; the cat with the 32 passed-through dims is 128 wide
    size = lambda op: ops[op].outputs[0].nbytes.eval(variables(1, 512))  # noqa: E731
    assert (size("attn.q.rope_cos"), size("attn.q.rope_pass")) == (2 * 512 * 24 * 96, 2 * 512 * 24 * 128)
    assert size("attn.k.rope_sin") == 2 * 512 * 8 * 96
    # every dim rotated (Phi-3-mini): no rotated slice at all, q itself is rotated
    mini = {op.name for op in layer_ops(resolve("microsoft/Phi-3-mini-4k-instruct"), setup)[0]}
    assert "attn.q.rope_cos" in mini and "attn.q.rot_part.slice" not in mini


def test_partial_rotary_factor_is_read_as_phi3_reads_it():
    base = dict(resolve("phi-4-mini").config)
    read = lambda **fields: spec_from_config({**base, **fields}, "p", "test").rotary_dim  # noqa: E731
    # Phi3Config keeps rope_parameters' own factor over the top-level field
    assert read(rope_parameters={"rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5}) == 64
    assert read(partial_rotary_factor=1.0) == 0 and read(partial_rotary_factor=None) == 0
    assert read(partial_rotary_factor=0.25) == 32
    for bad, why in ((0, "must be a number in (0, 1]"), (1.5, "must be a number in (0, 1]"),
                     ("0.75", "must be a number in (0, 1]"), (True, "must be a number in (0, 1]"),
                     (0.7, "rotates 89 of head_dim 128 dims, which must be an even number")):
        with pytest.raises(ModelError) as info:
            read(partial_rotary_factor=bad)
        assert why in str(info.value) and "\n" not in str(info.value)
    # Llama's rotary embedding ignores the field: every dim is rotated
    llama = dict(resolve("meta-llama/Meta-Llama-3-8B").config, partial_rotary_factor=0.5)
    assert spec_from_config(llama, "l", "test").rotary_dim == 0


def test_phi4_is_a_phi3_config_with_grouped_kv_and_no_window():
    spec = resolve("phi-4")
    assert spec.model_type == "phi3" and spec.arch.fused_qkv
    assert (spec.heads, spec.kv_heads, spec.head_dim) == (40, 10, 128)
    assert spec.layer_linears[0].out_features == 40 * 128 + 2 * 10 * 128   # qkv_proj
    assert spec.sliding_window is None and set(spec.layer_types) == {"full_attention"}


def test_phi3_fused_projections_backward_as_autograd_runs_it():
    """Phi3Attention slices qkv_proj's output into q, k, v: each SliceBackward0 fills a gradient of
    qkv's whole width, three per layer; Phi3MLP's gate_up chunk concatenates its halves' gradients
    (SplitBackward0 -> cat) into one of gate_up's width. Against simulate's step (Phi-3-mini QLoRA
    1 x 512), the estimate's allocations of 1 MiB or more share 98.5% in order, 93.8% before
    (docs/autograd.md#gradient-accumulation)."""
    import collections

    from vramplan import TrainSetup
    from vramplan.estimate._estimator import estimate
    from vramplan.estimate._events import compiled
    from vramplan.estimate._inventory import static_memory
    from vramplan.profile._stream_match import layer_backward_events

    spec = resolve("microsoft/Phi-3-mini-4k-instruct")
    est = estimate(spec, TrainSetup(method="qlora", seq=512, grad_ckpt=False))
    program = compiled(spec, est.setup, static_memory(spec, est.setup), est.cuda_arch, exact_layers=None)
    events = layer_backward_events(program.stream(program.sizes(est.setup), False), 16, 1 << 20)
    made = collections.Counter(n for kind, n in events if kind == "a")
    assert made[512 * (3072 + 2 * 3072) * 2] == 3          # q, k, v slices of the 9216-wide qkv
    # gate and up's 16384-wide gradient (bf16), and down_proj's float32 LoRA input gradient (8192 x 4 B)
    assert made[512 * 16384 * 2] == 2


def test_granite_multipliers_are_ops_in_the_walk():
    from vramplan import TrainSetup
    from vramplan.estimate._ops import embedding_leaf, head_ops, layer_ops

    config = json.loads((__import__("pathlib").Path(__file__).parent / "configs" / "granite-multipliers.json").read_text())
    spec, setup = spec_from_config(config, "granite", "test"), TrainSetup(seq=512)
    names = [op.name for op in layer_ops(spec, setup)[0]]
    assert "res1.scale" in names and "res2.scale" in names
    assert "logits_scale" in [op.name for op in head_ops(spec, setup)]
    assert embedding_leaf(spec, setup) == 2 * 512 * 512 and embedding_leaf(spec, setup.with_(grad_ckpt=False)) == 0


def test_smollm3_every_fourth_layer_skips_rope():
    from vramplan import TrainSetup
    from vramplan.estimate._ops import layer_ops, layer_stack

    spec = resolve("smollm3-3b-base")
    assert spec.rope_layers == (True, True, True, False) * 9 and spec.tied
    stack = layer_stack(spec, TrainSetup(seq=512))
    assert stack[0] is stack[1] and stack[3] is stack[7] and stack[0] is not stack[3]
    config = dict(spec.config, no_rope_layers=[1, 0] + [1] * 34)
    assert spec_from_config(config, "s", "test").rope_layers[:3] == (True, False, True)
    with pytest.raises(ModelError):
        spec_from_config(dict(spec.config, no_rope_layers=[1, 0]), "s", "test")


# --- olmo3 -------------------------------------------------------------------------------------

def test_olmo3_is_olmo2_with_three_sliding_layers_per_full_one():
    spec = resolve("allenai/Olmo-3-1025-7B")
    assert spec.arch.norm_placement == "post" and spec.arch.qk_norm == "projection"
    assert spec.norm_widths == (4096, 4096, 32 * 128, 32 * 128)
    assert spec.layer_types == (("sliding_attention",) * 3 + ("full_attention",)) * 8
    assert spec.sliding_window == 4096 and not spec.tied and spec.vocab == 100278


@pytest.mark.transformers
def test_olmo3_layer_types_default_and_window_come_from_olmo3config():
    from transformers import Olmo3Config

    config = {k: v for k, v in resolve("allenai/Olmo-3-1025-7B").config.items()
              if k not in ("layer_types", "sliding_window")}
    config["num_hidden_layers"] = 6
    spec = spec_from_config(config, "o", "test")
    expected = Olmo3Config(num_hidden_layers=6).layer_types
    assert list(spec.layer_types) == expected == ["sliding_attention"] * 3 + ["full_attention"] + ["sliding_attention"] * 2
    assert spec.sliding_window == Olmo3Config().sliding_window == 4096
    assert any("sliding_window = 4096 (transformers' Olmo3Config default)" in line for line in spec.defaults_used)
    # an explicit null is kept: the layers stay "sliding" but nothing is windowed
    assert spec_from_config(dict(config, sliding_window=None), "o", "test").sliding_window is None


def test_olmo3_keeps_a_rotary_embedding_per_layer_type():
    from vramplan.estimate._inventory import rope_kinds

    assert rope_kinds(resolve("allenai/Olmo-3-1025-7B")) == 2
    assert rope_kinds(resolve("allenai/OLMo-2-1124-7B")) == 1


def test_olmo3_sliding_and_full_layers_split_from_the_window_on():
    from vramplan import TrainSetup
    from vramplan.estimate._ops import layer_stack

    config = json.loads((CONFIGS / "olmo3-sliding.json").read_text())   # window 256
    spec = spec_from_config(config, "olmo3", "test")
    short = layer_stack(spec, TrainSetup(seq=255, grad_ckpt=False))
    long = layer_stack(spec, TrainSetup(seq=256, grad_ckpt=False))
    assert len(set(map(id, short))) == 1
    assert long[0] is long[1] is long[2] and long[3] is not long[0]
    assert long[0].saved > long[3].saved   # repeated k/v and the mask bias of the sliding layers


# --- ministral and mistral3 ---------------------------------------------------------------------

def test_ministral_8b_matches_the_model_card_count_and_attention_pattern():
    spec = resolve("ministral-8b")
    # model card, "Ministral 8B Architecture": Parameters 8,019,808,256; Attention Pattern
    # Ragged (128k, 32k, 32k, 32k)
    assert spec.num_params == 8_019_808_256
    assert spec.layer_types == (("full_attention",) + ("sliding_attention",) * 3) * 9
    assert spec.sliding_window == 32768 and (spec.heads, spec.kv_heads, spec.head_dim) == (32, 8, 128)
    assert not any(l.bias for l in spec.layer_linears)


@pytest.mark.transformers
def test_ministral_without_layer_types_slides_everywhere_as_ministralconfig_does():
    from transformers import MinistralConfig

    config = {k: v for k, v in resolve("ministral-8b").config.items() if k not in ("layer_types", "sliding_window")}
    spec = spec_from_config(config, "m", "test")
    assert list(spec.layer_types) == MinistralConfig(num_hidden_layers=36).layer_types == ["sliding_attention"] * 36
    assert spec.sliding_window == 4096
    none = spec_from_config(dict(config, sliding_window=None), "m", "test")
    assert set(none.layer_types) == {"full_attention"} and none.sliding_window is None


MISTRAL_SMALL_31 = "mistralai/Mistral-Small-3.1-24B-Instruct-2503"


def mistral_small_31():
    return resolve(MISTRAL_SMALL_31)


def test_mistral3_reads_the_text_decoder_and_says_what_it_leaves_out():
    spec = mistral_small_31()
    assert spec.model_type == "mistral" and spec.config["model_type"] == "mistral"
    assert (spec.hidden, spec.layers, spec.heads, spec.kv_heads, spec.head_dim) == (5120, 40, 32, 8, 128)
    assert spec.sliding_window is None and not spec.tied and spec.vocab == 131072
    assert len(spec.notes) == 1 and "Pixtral vision tower" in spec.notes[0] and "model_type mistral" in spec.notes[0]
    from vramplan import estimate
    assert spec.notes[0] in estimate(spec).assumptions


def test_mistral3_cli_estimates_a_local_config(tmp_path, capsys):
    from vramplan.cli import main

    from vramplan.core._models import catalog

    (tmp_path / "config.json").write_text(json.dumps(catalog()[MISTRAL_SMALL_31].config))   # the outer mistral3 config
    assert main(["estimate", str(tmp_path), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["model_type"] == "mistral" and data["model"]["num_hidden_layers"] == 40
    assert any("Pixtral vision tower" in a for a in data["assumptions"])


def test_mistral3_text_config_type_decides_the_family():
    outer = mistral_small_31().config   # the decoder config read from text_config
    wrapped = {"model_type": "mistral3", "text_config": {k: v for k, v in outer.items() if k != "model_type"}}
    assert spec_from_config(wrapped, "m3", "test").model_type == "mistral"   # Mistral3Config's default
    ministral = dict(wrapped, text_config=dict(wrapped["text_config"], model_type="ministral", sliding_window=64))
    assert spec_from_config(ministral, "m3", "test").layer_types == ("sliding_attention",) * 40
    # Ministral 3 (model_type ministral3) scales queries by position (Ministral3Attention): not modelled
    with pytest.raises(ModelError) as info:
        spec_from_config(dict(wrapped, text_config=dict(wrapped["text_config"], model_type="ministral3")), "m3", "t")
    assert "architecture 'ministral3'" in str(info.value) and "`vramplan simulate`" in str(info.value)


@pytest.mark.parametrize("model, family", [("allenai/Olmo-3-1025-7B", "olmo3"),
                                           ("mistralai/Ministral-8B-Instruct-2410", "ministral"),
                                           ("moonshotai/Moonlight-16B-A3B", "deepseek_v3")])
def test_cli_estimates_and_lists_the_new_families(capsys, monkeypatch, model, family):
    from vramplan.cli import main

    assert main(["estimate", model, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["id"] == model and data["model"]["model_type"] == family
    assert all(isinstance(v, int) and v > 0 for k, v in data["components"].items() if k != "gradients")
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models", model.split("/")[1]]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    at = lines.index([f"{family}:"])       # the family's own line, then its models
    assert lines[at + 1][0] == model


# --- MoE families: qwen3_moe, granitemoe -----------------------------------------------------------

def granite_3b_a800m():
    return resolve("ibm-granite/granite-3.1-3b-a800m-instruct")


def test_granite_moe_count_rounds_to_the_model_card():
    # model card: "# Parameters 3.3B" (40 experts of width 512 per layer, tied lm_head)
    spec = granite_3b_a800m()
    assert (spec.num_experts, spec.experts_per_tok, spec.intermediate, spec.tied) == (40, 8, 512, True)
    assert round(spec.num_params / B, 1) == 3.3 and spec.param_breakdown()["lm_head"] == 0


def test_qwen3_moe_reads_experts_of_moe_intermediate_size():
    spec = resolve("Qwen/Qwen3-30B-A3B")
    assert (spec.num_experts, spec.experts_per_tok, spec.intermediate) == (128, 8, 768)
    assert (spec.heads, spec.kv_heads, spec.head_dim) == (32, 4, 128)
    assert spec.norm_widths == (2048, 2048, 128, 128)        # Qwen3MoeRMSNorm q_norm / k_norm per head
    assert not any(l.bias for l in spec.layer_linears) and spec.layer_types == ("full_attention",) * 48


@pytest.mark.parametrize("field, value", [("mlp_only_layers", [0, 5]), ("decoder_sparse_step", 2)])
def test_qwen3_moe_dense_layers_are_one_line_errors(tmp_path, capsys, field, value):
    from vramplan.cli import main

    config = dict(resolve("Qwen/Qwen3-30B-A3B").config, **{field: value})
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert main(["estimate", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: ") and "(hint: `vramplan simulate`" in err
    assert "dense MLP layers among the MoE layers" in err and f"{field} {value}" in err


@pytest.mark.parametrize("model", ["Qwen/Qwen3-30B-A3B", "mistralai/Mixtral-8x7B-v0.1"])
def test_moe_router_loss_is_a_one_line_error(tmp_path, capsys, model):
    from vramplan.cli import main

    (tmp_path / "config.json").write_text(json.dumps(dict(resolve(model).config, output_router_logits=True)))
    assert main(["estimate", str(tmp_path)]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "output_router_logits" in err and "(hint: set output_router_logits to false" in err


def test_granite_moe_all_linear_leaves_experts_and_router_frozen():
    from vramplan.core._setup import TrainSetup
    from vramplan.estimate._inventory import experts_adapted, static_memory

    spec, setup = granite_3b_a800m(), TrainSetup()
    assert not experts_adapted(spec, setup)
    r, h, q, kv = setup.rank, spec.hidden, spec.heads * spec.head_dim, spec.kv_heads * spec.head_dim
    attention = r * (h + q) + 2 * r * (h + kv) + r * (q + h)           # q, k, v, o LoRA A and B
    assert static_memory(spec, setup).trainable_params == spec.layers * attention
    # Mixtral-style families adapt experts and router through ParamWrapper
    assert experts_adapted(resolve("Qwen/Qwen3-30B-A3B"), setup)


def test_granite_moe_refuses_4bit_experts(tmp_path, capsys):
    from vramplan.cli import main

    assert main(["estimate", "ibm-granite/granite-3.1-3b-a800m-instruct", "--experts", "4bit"]) != 0
    err = capsys.readouterr().err
    assert err == ("Error: --experts 4bit is not modelled for granitemoe: its experts never were per-expert "
                   "Linear layers (hint: drop --experts 4bit)\n")


@pytest.mark.parametrize("model, family", [("Qwen/Qwen3-30B-A3B", "qwen3_moe"),
                                           ("ibm-granite/granite-3.1-3b-a800m-instruct", "granitemoe")])
def test_cli_estimates_and_lists_the_moe_families(capsys, monkeypatch, model, family):
    from vramplan.cli import main

    assert main(["estimate", model, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["model"]["id"] == model and data["model"]["model_type"] == family
    monkeypatch.setenv("COLUMNS", "200")
    assert main(["models", family]) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines() if line.strip()]
    at = lines.index([f"{family}:"])       # the family's own line, then its models
    assert lines[at + 1][0] == model

def test_deepseek_v3_mla_projections_dense_layers_and_shared_experts():
    """DeepseekV3Attention / DeepseekV3MoE / DeepseekV3DecoderLayer (transformers 5.23): MLA
    projections with a q LoRA rank, first_k_dense_replace dense MLPs, then routed experts with
    n_shared_experts fused into one shared MLP; head_dim is qk_rope_head_dim (DeepseekV3Config)."""
    spec = resolve("deepseek-ai/DeepSeek-V3")
    lins = {l.name: (l.in_features, l.out_features, l.where) for l in spec.layer_linears}
    assert lins == {
        "self_attn.q_a_proj": (7168, 1536, "all"), "self_attn.q_b_proj": (1536, 128 * 192, "all"),
        "self_attn.kv_a_proj_with_mqa": (7168, 512 + 64, "all"), "self_attn.kv_b_proj": (512, 128 * 256, "all"),
        "self_attn.o_proj": (128 * 128, 7168, "all"),
        "mlp.gate_proj": (7168, 18432, "dense"), "mlp.up_proj": (7168, 18432, "dense"),
        "mlp.down_proj": (18432, 7168, "dense"),
        "mlp.shared_experts.gate_proj": (7168, 2048, "moe"), "mlp.shared_experts.up_proj": (7168, 2048, "moe"),
        "mlp.shared_experts.down_proj": (2048, 7168, "moe")}
    assert (spec.dense_layers, spec.moe_layers, spec.num_experts, spec.experts_per_tok) == (3, 58, 256, 8)
    assert (spec.expert_width, spec.router_groups, spec.head_dim) == (2048, (8, 4), 64)
    assert spec.norm_widths == (7168, 7168, 1536, 512)    # block norms, q_a_layernorm, kv_a_layernorm
    moon = resolve("moonshotai/Moonlight-16B-A3B")      # q_lora_rank null: a plain q_proj
    assert moon.mla.q_lora_rank is None and "self_attn.q_proj" in {l.name for l in moon.layer_linears}
    assert moon.norm_widths == (2048, 2048, 512) and moon.shared_intermediate == 2 * 1408


def test_deepseek_v3_all_linear_leaves_the_dense_and_shared_mlps_without_lora():
    """peft 0.21 _convert_peft_config_moe (deepseek_v3 -> the qwen2_moe conversion pattern) moves
    gate_proj / up_proj / down_proj from target_modules to the experts' target_parameters."""
    from vramplan.core._setup import TrainSetup
    from vramplan.estimate._inventory import adapted_linears

    spec = spec_from_config(json.loads((CONFIGS / "deepseek-v3-mla.json").read_text()), "ds", "test")
    assert {l.leaf for l in adapted_linears(spec, TrainSetup())} == {
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    with pytest.raises(ModelError, match="target_parameters of the routed experts"):
        adapted_linears(spec, TrainSetup(targets="q_b_proj,down_proj"))


def test_deepseek_v3_param_count_is_what_transformers_builds():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    for name in ("deepseek-v3-mla", "deepseek-v3-moonlight"):
        config = json.loads((CONFIGS / f"{name}.json").read_text())
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(
                transformers.CONFIG_MAPPING["deepseek_v3"].from_dict(config))
        assert spec_from_config(config, name, "test").num_params == sum(p.numel() for p in model.parameters())


def test_deepseek_v3_refuses_fewer_kv_heads():
    config = json.loads((CONFIGS / "deepseek-v3-mla.json").read_text())
    with pytest.raises(ModelError, match="num_key_value_heads 2 differs from num_attention_heads 8"):
        spec_from_config(dict(config, num_key_value_heads=2), "ds", "test")

# --- gpt_oss (docs/architectures.md#gpt_oss) -------------------------------------------------------

def test_gpt_oss_20b_matches_the_model_card_total_and_active_parameters():
    """gpt-oss-120b & gpt-oss-20b Model Card (OpenAI, arXiv 2508.10925), Table 1, gpt-oss-20b:
    20.91B total, 3.61B active per token (the huggingface.co/openai/gpt-oss-20b card: "21B
    parameters with 3.6B active"), MLP 19.12B, attention 0.64B. Active counts the unembedding,
    not the embedding lookup, and 4 of the 32 experts."""
    spec = resolve("openai/gpt-oss-20b")
    parts = spec.param_breakdown()
    assert round(spec.num_params / B, 2) == 20.91
    active = (spec.num_params - parts["embed_tokens"] - parts["layers.experts"]
              + parts["layers.experts"] * spec.experts_per_tok // spec.num_experts)
    assert round(active / B, 2) == 3.61
    assert round((parts["layers.experts"] + parts["layers.router"]) / B, 2) == 19.12
    assert round((parts["layers.linear"] + parts["layers.sinks"]) / B, 2) == 0.64


def test_gpt_oss_120b_shapes_match_the_model_card():
    """huggingface.co/openai/gpt-oss-120b/blob/main/config.json differs from the 20b's in depth (36
    layers, layer_types alternating over 36) and experts (128); the same model card table gives
    116.83B total, 5.13B active, MLP 114.71B, attention 0.96B."""
    config = dict(resolve("openai/gpt-oss-20b").config, num_hidden_layers=36, num_local_experts=128,
                  layer_types=["sliding_attention", "full_attention"] * 18)
    spec = spec_from_config(config, "openai/gpt-oss-120b", "test")
    parts = spec.param_breakdown()
    active = spec.num_params - parts["embed_tokens"] - parts["layers.experts"] + parts["layers.experts"] * 4 // 128
    assert (round(spec.num_params / B, 2), round(active / B, 2)) == (116.83, 5.13)
    assert round((parts["layers.experts"] + parts["layers.router"]) / B, 2) == 114.71
    assert round((parts["layers.linear"] + parts["layers.sinks"]) / B, 2) == 0.96


def test_gpt_oss_structure_comes_from_its_config():
    spec = resolve("openai/gpt-oss-20b")
    assert (spec.heads, spec.kv_heads, spec.head_dim, spec.hidden) == (64, 8, 64, 2880)
    assert spec.heads * spec.head_dim != spec.hidden           # head_dim is read, not derived
    assert (spec.num_experts, spec.experts_per_tok, spec.sliding_window) == (32, 4, 128)
    assert spec.layer_types[:4] == ("sliding_attention", "full_attention") * 2
    assert all(l.bias for l in spec.layer_linears)              # attention_bias: true
    assert dict(spec.moe_shapes())["experts.gate_up_proj"] == (32, 2880, 2 * 2880)   # (E, h, 2i)
    # without layer_types GptOssConfig.__post_init__ alternates, sliding first
    config = dict(spec.config)
    del config["layer_types"]
    assert spec_from_config(config, "g", "t").layer_types == spec.layer_types


def test_gpt_oss_counts_every_parameter_transformers_builds():
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = json.loads((CONFIGS / "gptoss-sinks.json").read_text())
    spec = spec_from_config(config, "gptoss", "t")
    hf = transformers.CONFIG_MAPPING["gpt_oss"].from_dict(config)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(hf)
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    assert {n.split("layers.0.", 1)[1] for n, _ in model.named_parameters() if ".layers.0.mlp." in n} == \
        {f"mlp.{name}" for name, _ in spec.moe_shapes()}


def test_gpt_oss_refuses_sdpa_and_4bit_experts_and_states_mxfp4(capsys):
    from vramplan.cli import main

    code = main(["estimate", "openai/gpt-oss-20b", "--attn", "sdpa"])
    err = capsys.readouterr().err
    assert code != 0 and err.count("\n") == 1 and err.startswith("Error: ") and "(hint: use --attn eager)" in err
    # without --attn, what from_pretrained picks: eager (GptOssPreTrainedModel._supports_sdpa = False)
    assert main(["estimate", "openai/gpt-oss-20b", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["setup"]["attn"] == "eager"
    code = main(["estimate", "openai/gpt-oss-20b", "--attn", "eager", "--experts", "4bit"])
    err = capsys.readouterr().err
    assert code != 0 and err.startswith("Error: --experts 4bit is not modelled for gpt_oss") and err.count("\n") == 1
    assert main(["estimate", "openai/gpt-oss-20b", "--attn", "eager", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert any("MXFP4" in a and "dequantized to bf16" in a for a in data["assumptions"])
    assert any(a.startswith("transformers 5 keeps gpt-oss experts and router") for a in data["assumptions"])
    # a bf16 copy of the checkpoint (no quantization_config) is the same model without the MXFP4 line
    config = {k: v for k, v in resolve("openai/gpt-oss-20b").config.items() if k != "quantization_config"}
    assert not any("MXFP4" in n for n in spec_from_config(config, "bf16-copy", "t").notes)
    assert data["warnings"][0].startswith("MoE experts stay 16-bit") and "--experts 4bit" not in data["warnings"][0]

# --- llama4_text (docs/architectures.md#llama4_text) -----------------------------------------------

SCOUT = "meta-llama/Llama-4-Scout-17B-16E"
LLAMA4_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def llama4_config(name: str = "llama4-interleave", **overrides) -> dict:
    return dict(json.loads((CONFIGS / f"{name}.json").read_text()), **overrides)


def catalog_config(model_id: str) -> dict:
    """The bundled config.json as published (a multimodal checkpoint keeps its text_config)."""
    from vramplan.core._models import catalog
    return catalog()[model_id].config


def test_llama4_scout_text_decoder_matches_the_model_card():
    """Llama 4 Scout model card (huggingface.co/meta-llama/Llama-4-Scout-17B-16E): "17B (Activated)
    109B (Total)", the total with the vision encoder. The text decoder Llama4ForCausalLM builds is
    107,769,861,120 parameters; one of the 16 routed experts per token plus the shared expert,
    attention, router, norms, embedding and lm_head are 17.17B active."""
    spec = resolve(SCOUT)
    parts = spec.param_breakdown()
    assert spec.model_type == "llama4_text" and spec.num_params == 107_769_861_120
    assert (spec.num_experts, spec.experts_per_tok, spec.expert_width, spec.moe_layers) == (16, 1, 8192, 48)
    active = spec.num_params - parts["layers.experts"] + parts["layers.experts"] * spec.experts_per_tok // spec.num_experts
    assert round(active / B) == 17 and round(active / B, 2) == 17.17


def test_llama4_scout_with_its_vision_tower_rounds_to_the_card_total():
    """What the text decoder leaves out (TEXT_CONFIG_NOTES): Llama4ForConditionalGeneration built
    from the catalog config on meta adds the vision tower and projector; the sum is the card's 109B."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = resolve(SCOUT)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(
            transformers.CONFIG_MAPPING["llama4"].from_dict(dict(catalog_config(SCOUT))))
    total = sum(p.numel() for p in model.parameters())
    assert total - spec.num_params == 871_932_416 and round(total / B) == 109
    assert any("about 0.87B parameters" in note for note in spec.notes)


MAVERICK = "meta-llama/Llama-4-Maverick-17B-128E"


def test_llama4_maverick_text_decoder_matches_the_model_card():
    """Llama 4 Maverick model card (huggingface.co/meta-llama/Llama-4-Maverick-17B-128E): "17B
    (Activated) 400B (Total)". interleave_moe_layer_step 2: layers 1, 3, ..., 47 hold the router,
    128 routed experts of 8192 and a shared expert of 8192; layers 0, 2, ..., 46 a dense MLP of
    16384. The text decoder Llama4ForCausalLM builds is 400,711,848,960 parameters: 24 x (router
    128 x 5120 + experts 128 x 3 x 5120 x 8192) + 24 x 3 x 5120 x 8192 (shared) + 24 x 3 x 5120 x
    16384 (dense) + 48 x (2 x 5120 x 5120 + 2 x 5120 x 1024) (attention) + 2 x 202048 x 5120 +
    norms; one routed expert per token: 17.18B active."""
    spec = resolve(MAVERICK)
    parts = spec.param_breakdown()
    assert spec.model_type == "llama4_text" and spec.num_params == 400_711_848_960
    assert (spec.num_experts, spec.experts_per_tok, spec.expert_width, spec.moe_layers, spec.dense_layers) == (
        128, 1, 8192, 24, 24)
    assert spec.dense_flags == (True, False) * 24
    assert parts["layers.experts"] == 24 * 128 * 3 * 5120 * 8192 and parts["layers.router"] == 24 * 128 * 5120
    assert parts["layers.linear"] == 24 * 3 * 5120 * 8192 + 24 * 3 * 5120 * 16384 + 48 * (2 * 5120 * 5120 + 2 * 5120 * 1024)
    assert 400 <= spec.num_params / B < 401
    active = spec.num_params - parts["layers.experts"] + parts["layers.experts"] * spec.experts_per_tok // spec.num_experts
    assert round(active / B) == 17 and round(active / B, 2) == 17.18
    # no q/k norm (Llama4TextAttention builds qk_norm only with use_qk_norm), no RoPE scaling
    assert spec.setting("use_qk_norm") is False and spec.norm_widths == (5120, 5120)
    assert spec.layer_types == ("chunked_attention",) * 3 + ("full_attention",) + spec.layer_types[4:]
    assert resolve("llama-4-maverick-17b-128e-instruct").id == MAVERICK


def test_llama4_maverick_with_its_vision_tower():
    """Llama4ForConditionalGeneration built from the catalog config on meta: the text decoder is
    every parameter but the vision tower and projector, which are as large as Scout's (the same
    vision_config, the projector's output the same 5120 hidden size)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    spec = resolve(MAVERICK)
    with torch.device("meta"):
        model = transformers.AutoModelForImageTextToText.from_config(
            transformers.CONFIG_MAPPING["llama4"].from_dict(dict(catalog_config(MAVERICK))))
    text = sum(p.numel() for n, p in model.named_parameters() if "language_model" in n)
    total = sum(p.numel() for p in model.parameters())
    assert text == spec.num_params and total - spec.num_params == 871_932_416
    assert any("about 0.87B parameters" in note for note in spec.notes)


@pytest.mark.parametrize("name", ["llama4-interleave", "llama4-scout", "llama4-maverick"])
def test_llama4_counts_every_parameter_transformers_builds(name):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = llama4_config(name)
    spec = spec_from_config(config, name, "test")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.CONFIG_MAPPING["llama4_text"].from_dict(config))
    assert spec.num_params == sum(p.numel() for p in model.parameters())
    moe_layer = next(i for i in range(spec.layers) if not spec.is_dense(i))
    built = {n.split(f"layers.{moe_layer}.", 1)[1]: tuple(p.shape) for n, p in model.named_parameters()
             if f".layers.{moe_layer}.feed_forward." in n and ("experts." in n or "router." in n)}
    assert built == {f"feed_forward.{n}": s for n, s in spec.moe_shapes()}


def test_llama4_layer_pattern_comes_from_its_config():
    """Llama4TextConfig.__post_init__: moe_layers, else every interleave_moe_layer_step-th layer;
    no_rope_layers (1 = RoPE), else every no_rope_layer_interval-th layer without; layer_types
    "chunked_attention" on the RoPE layers. Llama4TextDecoderLayer: dense layers get a
    Llama4TextMLP of intermediate_size_mlp, MoE layers a shared expert of intermediate_size."""
    spec = spec_from_config(llama4_config(), "l4", "test")
    assert spec.dense_flags == (True, False, True, False) and (spec.dense_layers, spec.moe_layers) == (2, 2)
    assert spec.rope_layers == (True, True, True, False)
    assert spec.layer_types == ("chunked_attention",) * 3 + ("full_attention",) and spec.attention_chunk == 256
    assert spec.sliding_window is None and spec.norm_widths == (512, 512)     # Llama4TextL2Norm has no weight
    lins = {l.name: (l.in_features, l.out_features, l.where) for l in spec.layer_linears if "feed_forward" in l.name}
    assert lins == {"feed_forward.shared_expert.gate_proj": (512, 256, "moe"),
                    "feed_forward.shared_expert.up_proj": (512, 256, "moe"),
                    "feed_forward.shared_expert.down_proj": (256, 512, "moe"),
                    "feed_forward.gate_proj": (512, 1024, "dense"), "feed_forward.up_proj": (512, 1024, "dense"),
                    "feed_forward.down_proj": (1024, 512, "dense")}
    explicit = spec_from_config(llama4_config(moe_layers=[0, 2, 3]), "l4", "test")
    assert explicit.dense_flags == (False, True, False, False)
    # an empty no_rope_layers is absent to Llama4TextConfig; a longer one is read by layer index
    assert spec_from_config(llama4_config(no_rope_layers=[]), "l4", "t").rope_layers == (True, True, True, False)
    assert spec_from_config(llama4_config(no_rope_layers=[0, 1, 1, 1, 0]), "l4", "t").rope_layers == (
        False, True, True, True)
    # no layer in moe_layers: a dense model, no router or experts
    dense = spec_from_config(llama4_config(moe_layers=[]), "l4", "test")
    assert dense.num_experts == 0 and {l.where for l in dense.layer_linears} == {"all"}
    assert all(l.out_features != 256 for l in dense.layer_linears)


def test_llama4_chunked_layers_get_a_mask_from_one_chunk_on():
    """masking_utils._ignore_causal_mask_sdpa keeps the chunked mask once kv_length >=
    attention_chunk_size; the no-RoPE (full attention) layers never get one."""
    from vramplan import TrainSetup
    from vramplan.estimate._ops import layer_stack, layer_windows

    spec = spec_from_config(llama4_config(), "l4", "test")
    assert layer_windows(spec, TrainSetup(seq=255, targets=LLAMA4_TARGETS)) == (False,) * 4
    assert layer_windows(spec, TrainSetup(seq=256, targets=LLAMA4_TARGETS)) == (True, True, True, False)
    stack = layer_stack(spec, TrainSetup(seq=512, targets=LLAMA4_TARGETS))
    # dense / MoE and RoPE / no-RoPE layers walk apart; layers 0 and 2 are alike
    assert stack[0] is stack[2] and len({id(m) for m in stack}) == 3


def test_llama4_explicit_layer_types_are_full_or_chunked():
    config = llama4_config(layer_types=["chunked_attention", "full_attention"] * 2)
    assert spec_from_config(config, "l4", "t").layer_types == ("chunked_attention", "full_attention") * 2
    with pytest.raises(ModelError, match="full_attention / chunked_attention"):
        spec_from_config(llama4_config(layer_types=["sliding_attention"] * 4), "l4", "t")


@pytest.mark.parametrize("argv, message, hint", [
    ((), "LoRA on llama4_text's router cannot run: peft wraps Llama4Router",
     "(hint: name the targets, e.g. --targets " + LLAMA4_TARGETS + ")"),
    (("--targets", "q_proj,router"), "LoRA on llama4_text's router cannot run", "(hint: name the targets"),
    (("--targets", LLAMA4_TARGETS, "--experts", "4bit"),
     "--experts 4bit is not modelled for llama4_text: its experts never were per-expert Linear layers",
     "(hint: drop --experts 4bit)"),
    (("--targets", LLAMA4_TARGETS, "--quant", "int8"), "int8 base weights are not modelled for llama4_text",
     "(hint: use --quant nf4 or fp4)"),
])
def test_llama4_refusals_are_one_line_errors(capsys, argv, message, hint):
    from vramplan.cli import main

    assert main(["estimate", SCOUT, *argv]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"Error: {message}") and hint in err


@pytest.mark.parametrize("field, value, message", [
    ("attention_chunk_size", None, "attention_chunk_size must be a positive integer, got None"),
    ("moe_layers", "1,3", "moe_layers must list layer indices"),
    ("no_rope_layers", [1, 0], "no_rope_layers must list 4 entries"),
])
def test_llama4_bad_configs_are_one_line_errors(tmp_path, capsys, field, value, message):
    from vramplan.cli import main

    (tmp_path / "config.json").write_text(json.dumps(llama4_config(**{field: value})))
    assert main(["estimate", str(tmp_path), "--targets", LLAMA4_TARGETS]) != 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("Error: ") and message in err and "(hint: " in err


def test_llama4_lora_leaves_router_and_experts_frozen_and_16bit(capsys):
    """peft has no MoE conversion for llama4 (transformers conversion_mapping): named targets adapt
    the attention projections and the shared-expert / dense MLPs; the router (an nn.Linear
    subclass bitsandbytes does not replace) and the 3D experts stay 16-bit and frozen."""
    from vramplan import TrainSetup
    from vramplan.cli import main
    from vramplan.estimate._inventory import expert_weight_bytes, experts_adapted, static_memory

    spec, setup = resolve(SCOUT), TrainSetup(targets=LLAMA4_TARGETS)
    assert not experts_adapted(spec, setup)
    r = setup.rank
    per_layer = sum(r * (l.in_features + l.out_features) for l in spec.layer_linears)
    assert static_memory(spec, setup).trainable_params == spec.layers * per_layer
    assert main(["estimate", SCOUT, "--targets", LLAMA4_TARGETS, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    sixteen, _ = expert_weight_bytes(spec, setup)
    assert data["model"]["model_type"] == "llama4_text" and len(data["warnings"]) == 1
    warning = data["warnings"][0]
    assert warning.startswith("MoE experts stay 16-bit") and f"({sixteen:,} bytes)" in warning
    assert "merged 16-bit copy" not in warning and "--experts 4bit" not in warning
    assert any(a.startswith("transformers 5 keeps Llama 4 experts") for a in data["assumptions"])


def test_llama4_simulate_refuses_lora_on_the_router_before_tracing():
    """The step would fail inside peft on the first forward (on any device): simulate says why."""
    pytest.importorskip("peft")
    pytest.importorskip("bitsandbytes")
    from vramplan import TrainSetup
    from vramplan.simulate import simulate

    spec = spec_from_config(llama4_config(), "l4", "test")
    with pytest.raises(ModelError, match="LoRA on llama4_text's router cannot run"):
        simulate(spec, TrainSetup(seq=32))
    # full fine-tuning has no adapters: nothing to refuse
    trace = simulate(spec, TrainSetup(seq=32, method="full"))
    assert trace.peak_allocated_bytes > 0


def test_llama4_chunked_loss_is_refused_by_estimate_and_simulate(capsys):
    """TRL's fused lm_head runs model.base_model for the hidden states; Llama4ForCausalLM's
    base_model_prefix ("language_model") names no attribute, so its base_model is the causal LM itself
    (transformers PreTrainedModel.base_model) and the fused forward cannot run."""
    from vramplan.cli import main

    assert main(["estimate", SCOUT, "--targets", LLAMA4_TARGETS, "--loss", "chunked"]) == 1
    err = capsys.readouterr().err
    assert err == ("Error: --loss chunked cannot run on llama4_text: TRL's fused lm_head reads the hidden states "
                   "from model.base_model, which for this model class is the causal LM itself "
                   "(hint: use --loss full)\n")
    # the same --targets with the full loss: estimated
    assert main(["estimate", SCOUT, "--targets", LLAMA4_TARGETS]) == 0


def test_simulate_refuses_the_fused_head_on_any_model_whose_base_model_is_itself():
    """Simulate checks the built model itself, so a family the registry does not know is caught too."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import Llama4ForCausalLM, Llama4TextConfig, LlamaConfig, LlamaForCausalLM

    from vramplan.core._errors import UsageError
    from vramplan.simulate._chunked_loss import add_fused_lm_head

    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=128)
    with torch.device("meta"):
        llama4 = Llama4ForCausalLM(Llama4TextConfig(**small, intermediate_size_mlp=128, head_dim=16))
        llama = LlamaForCausalLM(LlamaConfig(**small))
    assert llama4.base_model is llama4 and llama.base_model is llama.model
    with pytest.raises(UsageError, match="cannot run on Llama4ForCausalLM"):
        add_fused_lm_head(llama4)
    assert "forward" not in vars(llama)
    add_fused_lm_head(llama)   # a decoder at base_model: its forward is patched on the instance
    assert "forward" in vars(llama)


def test_phi3_eager_matmul_reads_the_rotary_cat_without_copies():
    """Phi-3's apply_rotary_pos_emb ends with torch.cat: q and k come out contiguous (b, H, s, hd),
    so eager attention's `torch.matmul(q, k.transpose(2, 3))` reshapes them to (b * H, s, hd) as
    views. Llama's rotary products keep the projection's transposed layout, which matmul copies
    at batch > 1 (simulate's step has the copies for Llama and not for Phi-3)."""
    from vramplan.core._setup import TrainSetup
    from vramplan.estimate._ops import layer_ops

    setup = TrainSetup(attn="eager", batch=2, seq=512)
    phi3 = {op.name for op in layer_ops(resolve("microsoft/Phi-3-mini-4k-instruct"), setup)[0]}
    llama = {op.name for op in layer_ops(resolve("meta-llama/Llama-2-7b"), setup)[0]}
    assert {"attn.q.rope_pass", "attn.k.rope_pass"} <= phi3 and not {"attn.q_copy", "attn.k_copy"} & phi3
    assert {"attn.q_copy", "attn.k_copy"} <= llama

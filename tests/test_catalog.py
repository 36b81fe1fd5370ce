"""The model catalog: every shipped config by its Hugging Face id, nested text configs, layer kinds,
and precisions read from the checkpoint; the GPU catalog's Blackwell systems."""

from __future__ import annotations

import json

import pytest

from emulator.catalog.gpus import get_gpu
from emulator.catalog.models import catalog_names, get_model
from emulator.catalog.quant import Quantization, read_quantization
from emulator.checkpoint import served_model
from emulator.spec import ModelSpec


def test_every_shipped_config_loads_by_its_hugging_face_id_and_by_its_last_part():
    names = catalog_names()
    assert len(names) >= 20
    for hf_id in names:
        m = get_model(hf_id)
        assert m.total_params() > 1e9 and m.layers > 0, hf_id
        assert get_model(hf_id.split("/")[1].lower()).total_params() == m.total_params()
    # the calibration set names GLM-5 under its old organisation
    assert get_model("zhipuai/GLM-5").hf_id == "zai-org/GLM-5"


@pytest.mark.parametrize(
    "name, total_b, active_b",
    [  # published sizes: model cards of each checkpoint
        ("Qwen/Qwen3.5-397B-A17B", 397, 17),  # multimodal wrapper: the language model sits in text_config
        ("moonshotai/Kimi-K2.5", 1026, 32.9),  # text_config, DeepSeek-V3 architecture with 384 experts
        ("openai/gpt-oss-120b", 116.8, 5.7),  # active counts the embedding here
        ("MiniMaxAI/MiniMax-M2.5", 229, 11),
        ("zai-org/GLM-5", 744, 41.8),
    ],
)
def test_parameter_counts_of_the_new_models(name, total_b, active_b):
    m = get_model(name)
    assert m.total_params() / 1e9 == pytest.approx(total_b, rel=0.02)
    assert m.active_params() / 1e9 == pytest.approx(active_b, rel=0.05)


def test_layer_kinds_sliding_window_linear_attention_and_dsa():
    oss = get_model("openai/gpt-oss-120b")
    assert (oss.full_layers, oss.sliding_layers, oss.sliding_window) == (18, 18, 128)
    q35 = get_model("Qwen/Qwen3.5-397B-A17B")
    assert (q35.full_layers, q35.linear_layers) == (15, 45) and q35.attn_output_gate
    # linear-attention state is per sequence, not per token: only the 15 full layers grow with context
    assert q35.kv_bytes_per_token("bf16") == 2 * 15 * 2 * 256 * 2
    assert q35.kv_bytes_per_seq("bf16") > 100e6  # 45 layers of 64 x 128 x 128 fp32 states
    glm = get_model("zai-org/GLM-5")
    assert glm.is_mla and glm.is_dsa and glm.index_topk == 2048
    # the DSA indexer caches an FP8 key (+ fp32 scale) per token per layer beside the MLA latent
    assert glm.kv_bytes_per_token("bf16") == 78 * ((512 + 64) * 2 + 128 + 4)


def test_precisions_come_from_the_checkpoint():
    nv = get_model("nvidia/Kimi-K2.5-NVFP4").quant
    assert (nv.gemm, nv.attention, nv.moe, nv.kv_cache) == ("nvfp4", "bf16", "nvfp4", "fp8")  # attention kept BF16
    r1 = get_model("deepseek-ai/DeepSeek-R1").quant
    assert (r1.gemm, r1.attention, r1.moe, r1.kv_cache) == ("fp8_block",) * 3 + ("bf16",)  # no KV declaration
    oss = get_model("openai/gpt-oss-120b").quant
    assert (oss.attention, oss.moe) == ("bf16", "mxfp4")
    kimi = get_model("moonshotai/Kimi-K2.5").quant  # compressed-tensors int4 experts, the rest ignored
    assert (kimi.gemm, kimi.attention, kimi.moe) == ("bf16", "bf16", "int4_wo")
    glm_fp8 = get_model("zai-org/GLM-5-FP8").quant  # excluded norms and indexer projections are not "attention"
    assert glm_fp8.attention == "fp8_block"
    assert get_model("llama-3.1-8b").quant == Quantization()


def test_an_fp8_kv_cache_halves_kv_bytes_and_fp4_weights_quarter_the_expert_bytes():
    bf = get_model("MiniMaxAI/MiniMax-M2.5")
    nv = get_model("nvidia/MiniMax-M2.5-NVFP4")
    assert nv.kv_bytes_per_token(nv.quant.kv_cache) * 2 == bf.kv_bytes_per_token(bf.quant.kv_cache)
    experts = bf.moe_layers * bf.routed_expert_params()
    assert bf.weight_bytes() - nv.weight_bytes() == pytest.approx(experts * (1.0 - 0.5625), rel=0.05)


def test_spec_overrides_the_checkpoint_precisions():
    m = served_model(ModelSpec(name="llama-3.1-70b", dtype="fp8", kv_cache_dtype="fp8"))
    assert (m.quant.gemm, m.quant.attention, m.quant.kv_cache) == ("fp8", "fp8", "fp8")
    # an NVFP4 release keeps its attention in BF16 even when the dense precision is overridden
    m = served_model(ModelSpec(name="nvidia/MiniMax-M2.5-NVFP4", dtype="fp8"))
    assert m.quant.attention == "bf16" and m.quant.gemm == "fp8"


def test_unsupported_quantization_names_the_method(tmp_path):
    with pytest.raises(ValueError, match="quant_method 'awq'"):
        read_quantization({"quant_method": "awq"}, None, 32)
    cfg = json.loads(
        json.dumps({"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 100})
    )
    cfg["quantization_config"] = {"quant_method": "gptq"}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="gptq"):
        get_model(str(path))


def test_a_path_to_a_config_folder_reads_its_hf_quant_config(tmp_path):
    src = get_model.__wrapped__("nvidia/GLM-5-NVFP4")  # the catalog's own reading
    folder = tmp_path / "glm5"
    folder.mkdir()
    from importlib import resources

    data = resources.files("emulator.catalog").joinpath("data/models")
    (folder / "config.json").write_text(data.joinpath("nvidia--GLM-5-NVFP4.config.json").read_text())
    (folder / "hf_quant_config.json").write_text(data.joinpath("nvidia--GLM-5-NVFP4.hf_quant_config.json").read_text())
    m = get_model(str(folder))
    assert m.quant.kv_cache == "fp8" and m.quant == src.quant


def test_blackwell_systems_and_their_fp4_path():
    for name, fp4 in (("b200", 9e15), ("b300", 14e15), ("gb200", 10e15), ("gb300", 15e15)):
        g = get_gpu(name)
        assert g.fp4_flops == fp4 and g.compute_dtype("nvfp4") == "fp4"
    h = get_gpu("h200")
    assert h.compute_dtype("nvfp4") == "bf16"  # Hopper runs FP4 weights weight-only (W4A16)
    assert h.compute_dtype("fp8_block") == "fp8"
    assert get_gpu("gb200").default_scale_up_tier == "nvl72"

"""Our packages must not shadow or break Hugging Face's optional `kernels` hub (ours is `engram_kernels`: a
top-level `kernels` of ours made transformers 5.25, which imports the hub's package at start-up, fail)."""

import importlib.metadata
import subprocess
import sys


def test_transformers_imports_and_runs_beside_our_kernels_package():
    code = (
        "import engram_kernels.quant, transformers, torch\n"
        "from transformers import DeepseekV3Config, DeepseekV3ForCausalLM\n"
        "from transformers.utils import is_kernels_available\n"
        "m = DeepseekV3ForCausalLM(DeepseekV3Config(vocab_size=32, hidden_size=32, intermediate_size=32,"
        " moe_intermediate_size=16, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,"
        " kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,"
        " n_routed_experts=4, num_experts_per_tok=1, n_group=1, topk_group=1))\n"
        "assert m(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 32)\n"
        "import importlib.util, pathlib\n"
        "spec = importlib.util.find_spec('kernels')\n"
        "assert spec is None or 'engram_kernels' not in str(spec.origin), spec\n"
        "print(is_kernels_available())\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    # transformers must not mistake our package for the HF `kernels` distribution
    try:
        importlib.metadata.version("kernels")
        hf_kernels_installed = True
    except importlib.metadata.PackageNotFoundError:
        hf_kernels_installed = False
    assert out.stdout.strip().splitlines()[-1] == str(hf_kernels_installed)

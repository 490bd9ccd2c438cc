"""`modelopt-lite trace`: summary, failures, symbol groups and --dump files."""

import pytest

from modelopt_lite.cli import main

pytest.importorskip("transformers")


def test_trace_tiny_llama_with_dump(tmp_path, capsys):
    rc = main(["trace", "--model", "tiny:llama", "--dump", str(tmp_path / "dump"), "--groups", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "GraphCollection of LlamaForCausalLM: 1 graph(s), 32/32 modules covered (15/15 linear layers)" in out
    assert "by export (FX failed: ValueError: code: co_varnames is too small)" in out
    assert "[searchable] model.layers.0.mlp.gate_proj.out_features, model.layers.0.mlp.up_proj.out_features, model.layers.0.mlp.down_proj.in_features" in out
    assert "layers that read the same activation (4 groups):" in out
    assert "  model.layers.0.self_attn.q_proj, model.layers.0.self_attn.k_proj, model.layers.0.self_attn.v_proj" in out
    assert "layers that write into a residual stream (4):" in out
    files = sorted(p.name for p in (tmp_path / "dump").iterdir())
    assert files == ["root.dot", "root.txt", "summary.txt"]
    text = (tmp_path / "dump" / "root.txt").read_text()
    assert "call_module[target=model.layers.0.self_attn.q_proj]" in text and "def forward" in text
    dot = (tmp_path / "dump" / "root.dot").read_text()
    assert dot.startswith('digraph "root" {') and '"model_layers_0_self_attn_q_proj" [label=' in dot and dot.rstrip().endswith("}")


def test_trace_reports_failures(capsys):
    rc = main(["trace", "--model", "tiny:bert", "--no-export"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "failed (" in out and "<root> [BertModel]: TypeError" in out


def test_trace_unknown_tiny_model(capsys):
    assert main(["trace", "--model", "tiny:nope"]) == 2
    assert "unknown tiny model 'nope'" in capsys.readouterr().err

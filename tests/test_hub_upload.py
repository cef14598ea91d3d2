"""hub_upload.py: repo folders for every family (offline), .bin conversion, configs, and the push path
through the real huggingface_hub client against tests/fake_hub.py."""

from __future__ import annotations

import ast
import json
import os
import sys
import types
from pathlib import Path

import pytest
import torch
import transformers
import yaml
from huggingface_hub import HfApi, ModelCard
from huggingface_hub import constants as hf_constants
from safetensors.torch import load_file, save_file

from fake_hub import FakeHub
from memory_efficient_adapter import families
from remote_code import assert_close_rel

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
import hub_card  # noqa: E402
import hub_upload  # noqa: E402

FP32_TOL = 1e-5
VOCAB = 61
TOKEN = "hf_testTOKEN0123456789sentinel"
# huggingface_hub's own LFS upload call (not ours) trips this httpx2 deprecation
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=<...>':DeprecationWarning")
SOURCE_LICENSE = "mit"


# ------------------------------------------------------------------------------------------- checkpoints
def stock_llama():
    config = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(config)


def stock_gpt2():
    config = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(config)


def stock_bloom():
    config = transformers.BloomConfig(vocab_size=VOCAB, hidden_size=32, n_layer=2, n_head=4)
    return transformers.BloomForCausalLM(config)


def stock_bart():
    config = transformers.BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2,
                                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                                     decoder_ffn_dim=64, max_position_embeddings=64)
    return transformers.BartForConditionalGeneration(config)


def our_qwen():
    from memory_efficient_adapter.configuration_qwen import QWenConfig
    from memory_efficient_adapter.modeling_qwen import QWenLMHeadModel

    config = QWenConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, kv_channels=8,
                        intermediate_size=64, seq_length=64, max_position_embeddings=64,
                        fp32=True)  # the original's automatic choice is bf16 where CUDA has it
    return QWenLMHeadModel(config)


# family -> (reference model builder, how the source stores its weights)
SOURCES = {
    "llama": (stock_llama, "safetensors"),
    "gpt2": (stock_gpt2, "bin"),  # lm_head.weight shares wte's storage
    "bloom": (stock_bloom, "bin-sharded"),
    "bart": (stock_bart, "bin"),  # shared / encoder / decoder embeddings and lm_head share one storage
    "qwen": (our_qwen, "safetensors-sharded"),  # as the Qwen-7B repos
}


QWEN_GENERATION_UTILS = '''"""Stands in for the Qwen-7B checkpoints' own qwen_generation_utils.py (not shipped)."""


def make_context(*args, **kwargs):
    raise NotImplementedError


decode_tokens = get_stop_words_ids = StopWordsLogitsProcessor = make_context
'''


def require_family(family: str) -> None:
    missing = [f for f in dict.fromkeys(e.file for e in hub_upload.FAMILIES[family].entries)
               if not (families.MODELING_DIR / f).is_file()]
    if missing:
        pytest.skip(f"modeling/{missing[0]} not written yet")


def write_tokenizer(folder: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["[UNK]", "[PAD]", "memory", "efficient", "attention", "Memory", "-", "kernel", "fused"]
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="[UNK]", pad_token="[PAD]")
    fast.save_pretrained(folder)


def make_source(family: str, folder: Path):
    """A tiny random checkpoint of ``family`` in ``folder`` (weights as the family's SOURCES entry says)."""
    build, weights = SOURCES[family]
    model = build().eval()
    model.save_pretrained(folder, **({"max_shard_size": "40KB"} if weights == "safetensors-sharded" else {}))
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    write_tokenizer(folder)
    (folder / "README.md").write_text(f"---\nlicense: {SOURCE_LICENSE}\nlanguage: en\n---\n\n# tiny {family}\n")
    (folder / "LICENSE").write_text("tiny test license\n")
    if family == "qwen":  # the Qwen-7B repos ship their own; a model repo must carry ours instead
        (folder / "qwen_generation_utils.py").write_text(QWEN_GENERATION_UTILS)
    if weights.startswith("bin"):
        for path in folder.glob("model*.safetensors*"):
            path.unlink()
        state_dict = model.state_dict()
        if weights == "bin":
            torch.save(state_dict, folder / "pytorch_model.bin")
        else:
            names = list(state_dict)
            shards = {"pytorch_model-00001-of-00002.bin": names[: len(names) // 2],
                      "pytorch_model-00002-of-00002.bin": names[len(names) // 2:]}
            for shard, keys in shards.items():
                torch.save({k: state_dict[k] for k in keys}, folder / shard)
            weight_map = {k: shard for shard, keys in shards.items() for k in keys}
            total_size = sum(t.numel() * t.element_size() for t in state_dict.values())
            index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
            (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return model


def write_config(path: Path, **raw) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def sample_ids(batch: int = 2, length: int = 7) -> torch.Tensor:
    return torch.randint(2, VOCAB, (batch, length))


def auto_class(family: str):
    return getattr(transformers, families.main_entry(family).auto_class)


def assert_same_logits(ours, reference, what: str) -> None:
    ids = sample_ids()
    with torch.no_grad():
        assert_close_rel(ours(input_ids=ids).logits, reference(input_ids=ids).logits, FP32_TOL, what)


def assert_is_ours(model, family: str) -> None:
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(model).__name__ == families.main_entry(family).class_name


def assert_no_token(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), f"token written to {path}"


# ------------------------------------------------------------------------------------------ the table
@pytest.mark.parametrize("family", list(hub_upload.FAMILIES))
def test_auto_map_lists_every_class_defined_in_the_file(family):
    require_family(family)
    defined = set()
    for name in dict.fromkeys(e.file for e in hub_upload.FAMILIES[family].entries):
        tree = ast.parse((families.MODELING_DIR / name).read_text())
        defined |= {node.name for node in tree.body if isinstance(node, ast.ClassDef)}
    expected = {e.auto_class: f"{Path(e.file).stem}.{e.class_name}"
                for e in hub_upload.FAMILIES[family].entries if e.class_name in defined}
    assert hub_upload.auto_map(family) == expected
    assert families.main_entry(family).class_name in defined
    assert hub_upload.auto_map(family, "org/code")[families.main_entry(family).auto_class].startswith("org/code--")


def test_card_backends_are_the_kernel_layers():
    from memory_efficient_adapter import BACKENDS

    assert set(hub_upload.BACKENDS) == {"auto", *BACKENDS}


@pytest.mark.parametrize("default", [None, "auto", "chunked"])
def test_the_card_says_how_to_pick_a_backend_as_the_kernel_layer_decides(default):
    """With a default in config.json, transformers' attn_implementation and USE_FLASH_ATTN are not read: the card
    offered them as ways to pick another backend."""
    from memory_efficient_adapter import backend_from_config

    config = types.SimpleNamespace(attn_backend=default, _attn_implementation="eager")
    text = hub_card.backends_markdown(default, ["bloom"])
    offers_attn_implementation = "`attn_implementation` (" in text
    assert offers_attn_implementation == (backend_from_config(config) == "eager")
    assert '"sdpa"' not in text.split("|")[0]  # names nothing
    assert "mea_" not in text  # registered only where the package is imported, not by a Hub repo's files
    assert "| `sdpa` | " in text and "(not BLOOM: it takes no ALiBi slopes)" in text
    assert "(not BLOOM" not in hub_card.backends_markdown(default, ["llama"])


# --------------------------------------------------------------------------------------- local folders
@pytest.mark.parametrize("family", list(SOURCES))
def test_local_dir_loads_as_our_code_and_matches_the_source(family, tmp_path, monkeypatch):
    require_family(family)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    reference = make_source(family, tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family=family, source=str(tmp_path / "source"),
                          target=f"org/{family}-mea", options={"backend": "chunked"})
    out = tmp_path / "out"
    assert hub_upload.main([str(config), "--local-dir", str(out)]) == 0

    names = {p.name for p in out.iterdir()}
    for name in hub_upload.family_files(family):  # ours, even where the source has a file of that name (Qwen)
        assert (out / name).read_bytes() == (families.MODELING_DIR / name).read_bytes()
    assert not any(name.endswith(".bin") for name in names)
    source_names = {p.name for p in (tmp_path / "source").iterdir()}
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        assert (out / name).read_bytes() == (tmp_path / "source" / name).read_bytes()
    if SOURCES[family][1].endswith("sharded"):
        index = json.loads((out / "model.safetensors.index.json").read_text())
        shards = set(index["weight_map"].values())
        assert len(shards) > 1 and shards <= names
        assert set(index["weight_map"]) == {key for shard in shards for key in load_file(out / shard)}
    else:
        assert "model.safetensors" in names
    for name in source_names & names:  # safetensors sources are copied byte for byte
        if name.endswith(".safetensors"):
            assert (out / name).read_bytes() == (tmp_path / "source" / name).read_bytes()

    config_json = json.loads((out / "config.json").read_text())
    assert config_json["auto_map"] == hub_upload.auto_map(family)
    assert config_json["attn_backend"] == "chunked"

    model = auto_class(family).from_pretrained(out, trust_remote_code=True).eval()
    assert_is_ours(model, family)
    assert model.config.attn_backend == "chunked"
    assert_same_logits(model, reference, f"{family} folder vs source")

    card = ModelCard.load(out / "README.md")
    assert card.data.license == SOURCE_LICENSE
    assert card.data.language == "en"
    assert f'from_pretrained("org/{family}-mea", trust_remote_code=True' in card.text
    assert all(f"`{name}`" in card.text for name in hub_upload.BACKENDS)
    assert_no_token(out)


def test_local_dir_verify_loads_the_folder(tmp_path, caplog):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out"), "--verify"]) == 0
    assert "verified: GPT2LMHeadModel" in caplog.text


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, capsys):
    require_family("bloom")
    make_source("bloom", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="bloom", source=str(tmp_path / "source"), target="org/b-mea")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    assert hub_upload.main([str(config), "--dry-run", "--private"]) == 0
    out = capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.rglob("*")) == before
    assert "-> org/b-mea@main (private)" in out
    shard_size = (tmp_path / "source" / "pytorch_model-00001-of-00002.bin").stat().st_size
    assert "model-00001-of-00002.safetensors" in out and "converted from pytorch_model-00001-of-00002.bin" in out
    assert hub_upload.human_size(shard_size) in out
    for name in ("modeling_bloom.py", "config.json", "tokenizer.json", "README.md", "model.safetensors.index.json"):
        assert name in out


def test_code_repo_holds_every_modeling_file(tmp_path):
    for family in hub_upload.FAMILIES:
        require_family(family)
    ours = {f for fam in hub_upload.FAMILIES for f in hub_upload.family_files(fam)}
    assert {"configuration_qwen.py", "qwen_generation_utils.py"} <= ours  # modeling_qwen.py imports both
    config = write_config(tmp_path / "c.yaml", family="all", publish="code", target="org/code")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out"), "--verify"]) == 0
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert files == {"README.md", *ours}
    for name in ours:
        assert (tmp_path / "out" / name).read_bytes() == (families.MODELING_DIR / name).read_bytes()
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.license == "apache-2.0"
    assert all(f"`{name}`" in card.text for name in ours)


def test_a_relative_import_missing_from_modeling_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "modeling_bloom.py").write_text("def helper():\n    from .bloom_helpers import run\n")
    monkeypatch.setattr(families, "MODELING_DIR", tmp_path)
    with pytest.raises(families.ModelingFilesError, match="bloom_helpers.py next to it"):
        hub_upload.family_files("bloom")
    config = write_config(tmp_path / "c.yaml", family="bloom", publish="code", target="org/code")
    assert hub_upload.main([str(config), "--dry-run"]) == 2  # reported as an error, not a traceback


# -------------------------------------------------------------------------------------- .bin conversion
def test_shared_tensors_are_stored_once_and_views_copied(tmp_path):
    embedding = torch.randn(6, 4)
    state_dict = {"emb.weight": embedding, "lm_head.weight": embedding, "first_rows": embedding[:2],
                  "transposed": torch.randn(3, 5).t(), "empty_a": torch.empty(0), "empty_b": torch.empty(0)}
    kept, aliases = hub_upload.storable_tensors(state_dict)
    assert aliases == {"lm_head.weight": "emb.weight"}
    assert set(kept) == set(state_dict) - {"lm_head.weight"}
    save_file(kept, tmp_path / "w.safetensors")  # raises on shared or non-contiguous tensors
    loaded = load_file(tmp_path / "w.safetensors")
    for name, tensor in kept.items():
        assert torch.equal(loaded[name], state_dict[name])


EXECUTED: list[str] = []


def _record_execution() -> dict:
    EXECUTED.append("pickle ran code")
    return {}


class CodeOnUnpickle:
    def __reduce__(self):
        return (_record_execution, ())


def test_bin_conversion_never_runs_pickled_code(tmp_path):
    torch.save({"weight": torch.ones(2), "payload": CodeOnUnpickle()}, tmp_path / "pytorch_model.bin")
    with pytest.raises(Exception, match="[Ww]eights.only"):
        hub_upload.convert_bin_to_safetensors(tmp_path / "pytorch_model.bin", tmp_path / "model.safetensors")
    assert EXECUTED == []
    assert not (tmp_path / "model.safetensors").exists()


# ---------------------------------------------------------------------------------------------- configs
def test_shipped_configs():
    configs = {p.name: hub_upload.load_config(p) for p in sorted((ROOT / "configs").glob("*.yaml"))}
    sources = {c.source for c in configs.values()}
    assert {"Qwen/Qwen-7B", "Qwen/Qwen-7B-Chat", "bigscience/bloom-560m", "bigscience/bloom-7b1",
            "facebook/bart-base", "facebook/bart-large", "openai-community/gpt2"} <= sources
    assert any("Llama-2" in (s or "") for s in sources) and any("Llama-3" in (s or "") for s in sources)
    code = [c for c in configs.values() if c.publish == "code"]
    assert len(code) == 1 and code[0].families == list(hub_upload.FAMILIES)
    assert len({c.target for c in configs.values()}) == len(configs)
    models = [c for c in configs.values() if c.publish == "model"]
    assert {c.family for c in models} == set(hub_upload.FAMILIES)
    assert all(c.target.endswith("-mea") and c.backend in hub_upload.BACKENDS for c in models)
    assert code[0].source is None  # a code repo holds only our files
    for cfg in models:  # a pinned commit, or a placeholder that stops a push until one is set
        if cfg.source_revision is not None:
            assert hub_upload.PINNED_REVISION.fullmatch(cfg.source_revision), cfg.name
            continue
        assert "# source_revision:" in Path(cfg.name).read_text(), cfg.name
        with pytest.raises(hub_upload.ConfigError, match="must pin a 40-hex commit"):
            hub_upload.check_pinned(cfg, allow_unpinned=False)
        hub_upload.check_pinned(cfg, allow_unpinned=True)


@pytest.mark.parametrize(
    "raw, message",
    [
        ({"family": "bloom", "source": "a/b", "target": "o/t", "optoins": {}}, "unknown keys"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"backend": "fast"}}, "backend"),
        ({"family": "falcon", "source": "a/b", "target": "o/t"}, "family"),
        ({"family": "bloom", "target": "o/t"}, "needs a `source`"),
        ({"family": "all", "source": "a/b", "target": "o/t"}, "family"),
        ({"family": "all", "publish": "code", "target": "o/t", "options": {"backend": "sdpa"}}, "no `backend`"),
        ({"family": "all", "publish": "code", "source": "Qwen/Qwen-7B", "target": "o/t"}, "no `source`"),
        ({"family": "all", "publish": "code", "target": "o/t", "options": {"license": "mit"}}, "or `license`"),
        ({"family": "bloom", "source": "a/b", "target": "no-org"}, "target"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"private": "yes"}}, "private"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"license": 5}}, "`options.license`"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"revision": None}}, "`options.revision`"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"revision": 7}}, "`options.revision`"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"backend": ["eager"]}}, "`options.backend`"),
        ({"family": "bloom", "source": "a/b", "target": "o/t", "options": []}, "`options` must be a mapping"),
        ({"family": "bloom", "source": 5, "target": "o/t"}, "`source` must be a string"),
    ],
)
def test_config_errors(raw, message):
    with pytest.raises(hub_upload.ConfigError, match=message):
        hub_upload.parse_config(raw)


def test_model_type_must_match_family(tmp_path, capsys):
    require_family("llama")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="llama", source=str(tmp_path / "source"), target="o/t")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 2
    assert "model_type 'gpt2'" in capsys.readouterr().err


def test_missing_token_fails_before_any_work(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(hf_constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(hub_upload, "load_config", lambda path: pytest.fail("read a config without a token"))
    assert hub_upload.main([str(ROOT / "configs" / "bloom-560m.yaml")]) == 2
    assert "needs a Hugging Face token" in capsys.readouterr().err


# ------------------------------------------------------------------------------------ the push path
@pytest.fixture
def hub(monkeypatch, tmp_path):
    """A FakeHub that huggingface_hub and transformers talk to, with a write token in HF_TOKEN."""
    with FakeHub(TOKEN) as fake:
        monkeypatch.setattr(hf_constants, "ENDPOINT", fake.url)
        template = fake.url + "/{repo_id}/resolve/{revision}/{filename}"
        monkeypatch.setattr(hf_constants, "HUGGINGFACE_CO_URL_TEMPLATE", template)
        monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)  # conftest makes the session offline
        monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)  # the fake speaks LFS, not Xet
        monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
        monkeypatch.setattr(transformers.utils.hub, "_hf_api", None, raising=False)  # 5.x caches an HfApi(endpoint)
        monkeypatch.setenv("HF_TOKEN", TOKEN)
        yield fake


def push(config: Path, *extra: str) -> int:
    return hub_upload.main([str(config), *extra])


def test_push_then_load_from_the_hub(hub, tmp_path, caplog):
    require_family("bloom")
    reference = make_source("bloom", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="bloom", source=str(tmp_path / "source"), target="org/bloom-mea")
    hub.fail("preupload", 503)  # a transient error: huggingface_hub retries it
    assert push(config, "--verify") == 0
    assert "verified: BloomForCausalLM" in caplog.text
    staged = [path for method, path in hub.requests if method == "POST" and "/preupload/hub-upload-verify-" in path]
    assert len(staged) == 2 and staged[0] == staged[1], "staged first (the 503 retried), then committed to main"
    assert hub.requests.count(("POST", "/api/models/org/bloom-mea/preupload/main")) == 1
    assert hub.commit_count("org/bloom-mea") == 3  # the repo's initial commit, the staged one, main's
    assert set(hub.repos["org/bloom-mea"].refs) == {"main"}, "the staging branch is deleted after the merge"
    assert any(method == "PUT" and path.startswith("/lfs-objects/") for method, path in hub.requests)
    files = hub.files("org/bloom-mea")
    assert hub.repos["org/bloom-mea"].resolve("main").files["model-00001-of-00002.safetensors"].lfs
    assert not hub.repos["org/bloom-mea"].resolve("main").files["config.json"].lfs
    assert {"modeling_bloom.py", "config.json", "README.md", "model.safetensors.index.json"} <= set(files)
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    assert not any(TOKEN.encode() in content for content in files.values())

    model = transformers.AutoModelForCausalLM.from_pretrained(
        "org/bloom-mea", trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    assert_is_ours(model, "bloom")
    assert_same_logits(model, reference, "bloom from the hub vs source")

    head = hub.head("org/bloom-mea")
    commits_before = [r for r in hub.requests if "/commit/" in r[1]]
    assert push(config) == 0
    assert "nothing changed, no new commit" in caplog.text
    assert hub.head("org/bloom-mea") == head and hub.commit_count("org/bloom-mea") == 3
    assert [r for r in hub.requests if "/commit/" in r[1]] == commits_before


def test_push_to_branch_and_pull_request(hub, tmp_path):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert push(config, "--revision", "dev", "--private") == 0
    repo = hub.repos["org/g"]
    assert repo.private
    assert "modeling_gpt2.py" in hub.files("org/g", "dev") and "modeling_gpt2.py" not in hub.files("org/g", "main")
    assert push(config, "--create-pr", "--verify") == 0  # verify loads the pull request's revision
    assert "modeling_gpt2.py" in hub.files("org/g", "refs/pr/1")
    assert "modeling_gpt2.py" not in hub.files("org/g", "main")


def test_hub_errors_are_reported_clearly(hub, tmp_path, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    hub.fail("commit", 500)  # the commit call itself is not retried (a retry could commit twice)
    assert push(config) == 1
    err = capsys.readouterr().err
    assert "the Hub answered HTTP 500" in err and TOKEN not in err
    hub.fail("create_repo", 401)
    assert push(config, "--token", "hf_wrong") == 1
    assert "HTTP 401" in capsys.readouterr().err


def test_unreachable_hub_is_reported_clearly(monkeypatch, tmp_path, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    monkeypatch.setattr(hf_constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: nothing listens
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", False)
    assert push(config, "--token", TOKEN) == 1
    err = capsys.readouterr().err
    assert "could not reach the Hub" in err and TOKEN not in err


def test_reference_config_loads_our_code_with_the_source_weights(hub, tmp_path):
    require_family("bloom")
    code = write_config(tmp_path / "code.yaml", family="bloom", publish="code", target="org/mea-code")
    assert push(code, "--verify") == 0
    reference = make_source("bloom", tmp_path / "stock")  # a plain checkpoint: no remote code in the repo
    api = HfApi(token=TOKEN)
    api.create_repo("bigscience/tiny-bloom")
    api.upload_folder(repo_id="bigscience/tiny-bloom", folder_path=tmp_path / "stock")

    assert hub_upload.main(["--reference", "bigscience/tiny-bloom", "--family", "bloom", "--code-repo",
                            "org/mea-code", "--backend", "eager", "--local-dir", str(tmp_path / "ref")]) == 0
    written = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert written["auto_map"]["AutoModelForCausalLM"] == "org/mea-code--modeling_bloom.BloomForCausalLM"
    assert written["attn_backend"] == "eager"

    hub.requests.clear()
    config = transformers.AutoConfig.from_pretrained(tmp_path / "ref")
    model = transformers.AutoModelForCausalLM.from_pretrained(
        "bigscience/tiny-bloom", config=config, trust_remote_code=True, cache_dir=tmp_path / "cache").eval()
    assert_is_ours(model, "bloom")
    downloads = [path for method, path in hub.requests if method == "GET" and "/resolve/" in path]
    assert any(p.startswith("/org/mea-code/resolve/") and p.endswith("modeling_bloom.py") for p in downloads)
    assert any(p.startswith("/bigscience/tiny-bloom/resolve/") and ".bin" in p for p in downloads)
    assert_same_logits(model, reference, "reference config: code repo + source weights")


def test_model_repo_from_a_hub_source(hub, tmp_path, capsys):
    require_family("bloom")
    reference = make_source("bloom", tmp_path / "stock")
    api = HfApi(token=TOKEN)
    api.create_repo("bigscience/tiny-bloom")
    source_commit = api.upload_folder(repo_id="bigscience/tiny-bloom", folder_path=tmp_path / "stock").oid
    config = write_config(tmp_path / "c.yaml", family="bloom", source="bigscience/tiny-bloom", target="org/b-mea")

    assert hub_upload.main([str(config), "--dry-run"]) == 0
    plan = capsys.readouterr().out
    bin_size = (tmp_path / "stock" / "pytorch_model-00002-of-00002.bin").stat().st_size
    assert f"model-00002-of-00002.safetensors  {hub_upload.human_size(bin_size):>9}" in plan

    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 0
    assert f"`bigscience/tiny-bloom`](https://huggingface.co/bigscience/tiny-bloom) at commit `{source_commit}`" in (
        tmp_path / "out" / "README.md").read_text()
    assert ModelCard.load(tmp_path / "out" / "README.md").data.base_model == "bigscience/tiny-bloom"
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    assert_is_ours(model, "bloom")
    assert_same_logits(model, reference, "bloom built from a hub source")


# ------------------------------------------------------------------------------- sources that lie (issue 13)
def test_a_link_out_of_the_source_folder_is_refused(tmp_path, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    secret = tmp_path / "token-file"
    secret.write_text(TOKEN)
    (tmp_path / "source" / "LICENSE").unlink()
    (tmp_path / "source" / "LICENSE").symlink_to(secret)
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 2
    assert "LICENSE is a link to" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert not any(TOKEN.encode() in p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and p != secret
                   and not p.is_symlink())


def test_a_link_inside_the_source_folder_is_followed(tmp_path):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    (tmp_path / "source" / "LICENSE").rename(tmp_path / "source" / "LICENSE.txt")
    (tmp_path / "source" / "LICENSE").symlink_to("LICENSE.txt")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "LICENSE").read_text() == "tiny test license\n"


@pytest.mark.parametrize("shard", ["../x.safetensors", "/tmp/x.safetensors", "sub/x.safetensors", "..", ""])
def test_shard_names_must_be_plain_file_names(tmp_path, capsys, shard):
    require_family("llama")
    make_source("llama", tmp_path / "source")
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": shard}}
    (tmp_path / "source" / "model.safetensors.index.json").write_text(json.dumps(index))
    config = write_config(tmp_path / "c.yaml", family="llama", source=str(tmp_path / "source"), target="org/l")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "build" / "out")]) == 2
    assert "is not a plain file name" in capsys.readouterr().err
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "build").exists()


def test_the_card_lists_the_sources_python_files_with_their_sha256(tmp_path):
    import hashlib

    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    code = b"raise SystemExit('third-party tokenizer code ran')\n"
    (tmp_path / "source" / "tokenization_tiny.py").write_bytes(code)
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "## Third-party code" in card
    assert f"| `tokenization_tiny.py` | `{hashlib.sha256(code).hexdigest()}` |" in card


@pytest.mark.parametrize("folder, repo", [("models--org--tiny-gpt2/snapshots/" + "a1" * 20, "org/tiny-gpt2"),
                                          ("source", None)])
def test_the_card_names_the_hub_repo_of_a_cache_snapshot_source(folder, repo, tmp_path):
    """A Hugging Face cache snapshot (what `hf download` prints) was named by its commit folder, with no base_model."""
    require_family("gpt2")
    make_source("gpt2", tmp_path / folder)
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / folder), target="org/g")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert card.data.base_model == repo
    named = f"[`{repo}`](https://huggingface.co/{repo}) at commit `{Path(folder).name}`"
    assert (named in card.text) == (repo is not None)
    assert (f"a local checkpoint (`{Path(folder).name}`)" in card.text) == (repo is None)


def test_local_dir_verify_runs_the_folders_code_in_a_child_without_the_token(tmp_path, monkeypatch, caplog):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    # tokenizer code that records the environment it runs in (trust_remote_code runs it while loading)
    (tmp_path / "source" / "tokenization_spy.py").write_text(
        "import os, pathlib\n"
        f"pathlib.Path({str(tmp_path / 'spy.txt')!r}).write_text(f\"{{os.getpid()}} {{os.environ.get('HF_TOKEN')}}\")\n"
        "from transformers import PreTrainedTokenizerFast\n\n\nclass SpyTokenizer(PreTrainedTokenizerFast):\n    pass\n")
    tokenizer_config = json.loads((tmp_path / "source" / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_spy.SpyTokenizer"]}
    (tmp_path / "source" / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out"), "--verify"]) == 0
    assert "verified: GPT2LMHeadModel" in caplog.text
    pid, token = (tmp_path / "spy.txt").read_text().split()
    assert int(pid) != os.getpid() and token == "None"


# ------------------------------------------------------------------------------------ checks before writing
def test_a_bloom_backend_that_cannot_take_alibi_is_refused_before_writing(tmp_path, capsys):
    import memory_efficient_adapter as mea

    runnable_here = set(hub_upload.BACKENDS_WITHOUT_ALIBI) & set(mea.available_backends("cpu"))
    assert "sdpa" in runnable_here
    for backend in runnable_here:  # the rule agrees with the kernel layer
        q = torch.randn(1, 2, 4, 8)
        with pytest.raises(ValueError, match="ALiBi"):
            mea.attention(q, q, q, causal=True, alibi_slopes=mea.alibi_slopes(2), backend=backend)
    with pytest.raises(hub_upload.ConfigError, match="ALiBi"):
        hub_upload.parse_config({"family": "bloom", "source": "a/b", "target": "o/t", "options": {"backend": "sdpa"}})
    assert hub_upload.parse_config({"family": "llama", "source": "a/b", "target": "o/t",
                                    "options": {"backend": "sdpa"}}).backend == "sdpa"
    make_source("bloom", tmp_path / "stock")
    assert hub_upload.main(["--reference", str(tmp_path / "stock"), "--family", "bloom", "--code-repo", "org/code",
                            "--backend", "sdpa", "--local-dir", str(tmp_path / "ref")]) == 2
    error = capsys.readouterr().err
    assert "cannot run bloom" in error and "use auto" in error and not (tmp_path / "ref").exists()
    assert hub_upload.main(["--reference", str(tmp_path / "stock"), "--family", "bloom", "--code-repo", "org/code",
                            "--backend", "chunked", "--local-dir", str(tmp_path / "ref")]) == 0
    assert json.loads((tmp_path / "ref" / "config.json").read_text())["attn_backend"] == "chunked"


def test_a_failed_local_build_leaves_no_folder_and_the_retry_works(tmp_path, monkeypatch, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")

    def disk_full(*args):
        raise hub_upload.ConfigError("disk full (simulated)")

    monkeypatch.setattr(hub_upload, "convert_bin_to_safetensors", disk_full)
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 2
    assert "disk full" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.yaml", "source"], "no partial folder, no leftovers"
    monkeypatch.undo()
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "model.safetensors").exists()


def test_every_config_is_checked_before_the_first_push(hub, tmp_path, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    good = write_config(tmp_path / "good.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/good")
    bad = write_config(tmp_path / "bad.yaml", family="llama", source=str(tmp_path / "source"), target="org/bad")
    unpinned = write_config(tmp_path / "unpinned.yaml", family="gpt2", source="openai-community/gpt2",
                            target="org/hub")
    assert hub_upload.main([str(good), str(bad), str(unpinned)]) == 2
    captured = capsys.readouterr()
    assert "model_type 'gpt2'" in captured.err and "must pin a 40-hex commit" in captured.err
    assert "nothing was written or pushed" in captured.err
    assert "summary: 0 done, 2 failed" in captured.out
    assert hub.repos == {} and not any(method == "POST" for method, _ in hub.requests)


def test_pinned_sources_push_and_the_summary_names_each_config(hub, tmp_path, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "stock")
    api = HfApi(token=TOKEN)
    api.create_repo("openai-community/tiny-gpt2")
    pinned = api.upload_folder(repo_id="openai-community/tiny-gpt2", folder_path=tmp_path / "stock").oid
    api.upload_file(repo_id="openai-community/tiny-gpt2", path_or_fileobj=b"later\n", path_in_repo="LICENSE")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source="openai-community/tiny-gpt2",
                          source_revision=pinned, target="org/g")
    code = write_config(tmp_path / "code.yaml", family="gpt2", publish="code", target="org/code")
    assert hub_upload.main([str(config), str(code)]) == 0
    out = capsys.readouterr().out
    assert "summary: 2 pushed, 0 failed" in out
    assert f"ok      {config}: pushed to org/g@main" in out and f"ok      {code}: pushed to org/code@main" in out
    assert hub.files("org/g")["LICENSE"] == b"tiny test license\n", "read at the pinned commit, not main"
    assert pinned in hub.files("org/g")["README.md"].decode()
    unpinned = write_config(tmp_path / "u.yaml", family="gpt2", source="openai-community/tiny-gpt2", target="org/u")
    assert hub_upload.main([str(unpinned), "--allow-unpinned"]) == 0
    assert hub.files("org/u")["LICENSE"] == b"later\n"


def test_a_failed_verify_leaves_the_target_branch_untouched(hub, tmp_path, capsys):
    require_family("gpt2")
    make_source("gpt2", tmp_path / "source")
    config = write_config(tmp_path / "c.yaml", family="gpt2", source=str(tmp_path / "source"), target="org/g")
    assert push(config) == 0
    head, files = hub.head("org/g"), hub.files("org/g")
    model = stock_gpt2()
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))  # loads, but gives NaN logits: verification fails
    model.save_pretrained(tmp_path / "source")
    assert push(config, "--verify") == 1
    captured = capsys.readouterr()
    assert "non-finite logits" in captured.err and "org/g@main is untouched" in captured.err
    assert "FAILED" in captured.out
    assert hub.head("org/g") == head and hub.files("org/g") == files
    staging = [ref for ref in hub.repos["org/g"].refs if ref.startswith("hub-upload-verify-")]
    assert len(staging) == 1 and hub.files("org/g", staging[0]) != files


def test_an_offline_hub_names_the_repo_it_could_not_reach(tmp_path, monkeypatch, capsys):
    config = write_config(tmp_path / "c.yaml", family="gpt2", source="openai-community/gpt2", target="org/g")
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    assert hub_upload.main([str(config), "--local-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "could not reach the Hub for source openai-community/gpt2" in err
    assert err.count("could not reach the Hub") == 1, "said once, not wrapped again by an outer reaching()"
    assert not (tmp_path / "out").exists()


def write_gpt2_configs(tmp_path: Path, *targets: str) -> list[str]:
    make_source("gpt2", tmp_path / "source")
    return [str(write_config(tmp_path / f"c{i}.yaml", family="gpt2", source=str(tmp_path / "source"), target=target))
            for i, target in enumerate(targets)]


def write_source_file(tmp_path: Path, name: str, text: str | None) -> list[str]:
    """A gpt2 config whose source's ``name`` holds ``text`` (None: has no ``name``), built into out/."""
    configs = write_gpt2_configs(tmp_path, "org/g")
    if text is None:
        (tmp_path / "source" / name).unlink()
    else:
        (tmp_path / "source" / name).write_text(text)
    return [*configs, "--local-dir", str(tmp_path / "out")]


def file_in_the_way(tmp_path: Path) -> Path:
    (tmp_path / "afile").write_text("mine\n")
    return tmp_path / "afile"


def reference_into_a_file(tmp_path: Path) -> list[str]:
    make_source("gpt2", tmp_path / "source")
    return ["--reference", str(tmp_path / "source"), "--family", "gpt2", "--code-repo", "org/code", "--local-dir",
            str(file_in_the_way(tmp_path))]


BAD_INPUTS = {  # case -> (its command line, written under tmp_path; what the error says)
    "no config.json": (lambda d: write_source_file(d, "config.json", None), "has no config.json"),
    "invalid config.json": (lambda d: write_source_file(d, "config.json", "{bad"), "not readable as JSON"),
    "config.json a list": (lambda d: write_source_file(d, "config.json", "[1]"), "expected a JSON object, not a list"),
    "index names a missing shard": (
        lambda d: write_source_file(d, "model.safetensors.index.json", json.dumps({"weight_map": {"w": "gone.st"}})),
        "names shards that the source does not have: ['gone.st']"),
    "two targets of one repo name": (lambda d: [*write_gpt2_configs(d, "org1/same", "org2/same"), "--local-dir",
                                                str(d / "out")], "share the repo name"),
    "--local-dir under a file": (lambda d: [*write_gpt2_configs(d, "org/g"), "--local-dir",
                                            str(file_in_the_way(d) / "sub")], "afile is a file, not a folder"),
    "--reference --local-dir a file": (reference_into_a_file, "afile is a file, not a folder"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_sources_and_local_dirs_are_refused_before_writing(case, tmp_path, capsys):
    require_family("gpt2")
    make_argv, message = BAD_INPUTS[case]
    argv = make_argv(tmp_path)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert hub_upload.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before, "nothing is written"

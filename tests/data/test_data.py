"""Document sources and training sequences: gzip shards, folders, globs, named errors for missing or
empty shards, weighted mixtures (cached and streamed), and the train/eval disjointness check."""

import gzip
import json

import pytest
import torch

from seer_attn import load_tokenizer
from seer_attn.data import (
    boundary_token_ids,
    build_sequences,
    check_disjoint,
    find_overlap,
    load_documents,
    parse_weights,
    resolve_data_files,
    source_label,
)

LENGTH = 64


def _write_shards(folder, docs_per_shard, n_shards, word, extra=None):
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for s in range(n_shards):
        with gzip.open(folder / f"train-{s:05d}-of-{n_shards:05d}.jsonl.gz", "wt", encoding="utf-8") as f:
            for d in range(docs_per_shard):
                text = f"{word} {s} {d} " + f"{word} " * (40 + 7 * d)
                rec = {"text": text, "title": f"{word} {s}.{d}", "source": f"github:o/{word}:{s}/{d}.txt", **(extra or {})}
                f.write(json.dumps(rec) + "\n")
                texts.append(text)
    return texts


@pytest.fixture
def shards(tmp_path):
    return tmp_path / "shards", _write_shards(tmp_path / "shards", 4, 3, "alpha")


def test_load_documents_reads_gzip_shards_folder_glob_and_stream(shards):
    folder, texts = shards
    assert load_documents(str(folder))["text"] == texts  # file order, then line order
    assert load_documents(str(folder / "*.jsonl.gz"))["text"] == texts
    assert load_documents(str(folder / "train-00001-of-00003.jsonl.gz"))["text"] == texts[4:8]
    streamed = [r["text"] for r in load_documents(str(folder), streaming=True)]
    assert streamed == texts
    shuffled = [r["text"] for r in load_documents(str(folder), streaming=True, seed=1)]
    assert shuffled != texts and sorted(shuffled) == sorted(texts)
    assert len(list(load_documents(str(folder), streaming=True, max_documents=5))) == 5
    assert [source_label(s) for s in (str(folder), str(folder) + "/", str(folder / "*.jsonl.gz"))] == ["shards"] * 3


def test_resolve_data_files_named_errors(shards, tmp_path):
    folder, _ = shards
    assert [f.name for f in resolve_data_files(str(folder))] == [f"train-{i:05d}-of-00003.jsonl.gz" for i in range(3)]
    (folder / "train-00001-of-00003.jsonl.gz").unlink()
    with pytest.raises(FileNotFoundError, match=r"shard train-00001-of-00003.jsonl.gz missing .* \(2 of 3 present\)"):
        load_documents(str(folder))
    with pytest.raises(FileNotFoundError, match="shard train-00001-of-00003.jsonl.gz missing"):
        load_documents(str(folder / "train-*.jsonl.gz"))
    with pytest.raises(FileNotFoundError, match="matches no"):
        load_documents(str(tmp_path / "nothing-*.jsonl.gz"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_documents(str(tmp_path / "missing.jsonl.gz"))
    with pytest.raises(FileNotFoundError, match="holds no"):
        load_documents(str(tmp_path))  # only a sub-folder, no data file
    empty = tmp_path / "empty"
    empty.mkdir()
    with gzip.open(empty / "a.jsonl.gz", "wt") as f:
        f.write("\n\n")
    with pytest.raises(ValueError, match=r"shard .*a.jsonl.gz is empty \(no data after decompression\)"):
        load_documents(str(empty))
    (empty / "a.jsonl.gz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"a.jsonl.gz is empty \(0 bytes\)"):
        load_documents(str(empty / "a.jsonl.gz"), streaming=True)
    (empty / "a.jsonl.gz").write_bytes(b"not gzip at all")
    with pytest.raises(ValueError, match="not a readable gzip file"):
        load_documents(str(empty / "a.jsonl.gz"))


def _share(seqs, marker_id):
    return sum(bool((s == marker_id).any()) for s in seqs) / len(seqs)


def test_build_sequences_weighted_mixture(tiny_llama_dir, tmp_path):
    tok = load_tokenizer(tiny_llama_dir)
    _write_shards(tmp_path / "a", 6, 2, "x", extra={"lang": "en"})  # an extra field: per-file loading copes
    _write_shards(tmp_path / "b", 6, 2, "7")
    xa, xb = (tok(w, add_special_tokens=False).input_ids[0] for w in ("x", "7"))
    a, b = str(tmp_path / "a"), str(tmp_path / "b" / "*.jsonl.gz")
    only_a = build_sequences(a, tok, LENGTH)
    only_b = build_sequences(b, tok, LENGTH)
    assert len(only_a) > 10 and len(only_b) > 10
    assert _share(only_a[:]["input_ids"], xa) == 1.0 and _share(only_a[:]["input_ids"], xb) == 0.0

    both = build_sequences(f"{a},{b}", tok, LENGTH)  # no weights: concatenated
    assert len(both) == len(only_a) + len(only_b)
    mixed = build_sequences(f"{a},{b}", tok, LENGTH, weights="0.8,0.2", seed=0)
    ids = mixed[:]["input_ids"]
    assert ids.shape[1] == LENGTH and (ids[:, 0] == boundary_token_ids(tok)[0]).all()
    # all_exhausted: b (weight 0.2) is used up once, a repeats; each row comes from one source
    assert len(mixed) >= len(only_b) / 0.2 * 0.7
    assert _share(ids, xa) == pytest.approx(0.8, abs=0.1) and _share(ids, xa) + _share(ids, xb) == pytest.approx(1.0)

    stream = build_sequences(f"{a},{b}", tok, LENGTH, weights=[4, 1], seed=0, streaming=True, shuffle_buffer=16)
    rows = [r["input_ids"] for r in stream]
    assert all(isinstance(r, torch.Tensor) and r.shape == (LENGTH,) for r in rows)
    assert _share(rows, xa) == pytest.approx(0.8, abs=0.12)
    with pytest.raises(ValueError, match="2 dataset weights for 1 dataset"):
        build_sequences(a, tok, LENGTH, weights="0.5,0.5")


def test_parse_weights():
    assert parse_weights("0.7,0.3", 2) == pytest.approx([0.7, 0.3])
    assert parse_weights("3 1", 2) == pytest.approx([0.75, 0.25])
    assert parse_weights(None, 3) is None
    with pytest.raises(ValueError, match="must all be > 0"):
        parse_weights("1,0", 2)


def test_streaming_trainer_runs_and_needs_max_steps(tiny_llama_dir, tmp_path):
    from seer_attn.training.distill import main

    data = tmp_path / "d"
    _write_shards(data, 6, 2, "x")
    args = ["--model", tiny_llama_dir, "--dataset", f"{data},{data}/train-00000-of-00002.jsonl.gz", "--dataset_weights",
            "0.5,0.5", "--streaming", "--train_length", str(LENGTH), "--warmup_steps", "0", "--save_strategy", "no",
            "--dataloader_pin_memory", "false", "--output_dir", str(tmp_path / "o")]
    out = main(args + ["--max_steps", "2"])
    log = [json.loads(line) for line in (tmp_path / "o" / "gate_loss.jsonl").read_text().splitlines()]
    assert out == str(tmp_path / "o") and [r["step"] for r in log] == [1, 2]
    with pytest.raises(ValueError, match="--streaming needs --max_steps"):
        main(args + ["--max_steps", "-1"])


def test_check_disjoint_finds_shared_text_source_or_title(tmp_path):
    train = [{"text": "book one", "title": "Book One", "source": "github:a/b:1.txt"}, {"text": "code", "source": "github:c/d:x.c"}]
    test = [{"text": "other", "title": "Another", "source": "github:a/b:2.txt"}]
    assert find_overlap(train, test) == []
    assert find_overlap(train, [{"text": "book one", "title": "x"}]) == [("text", "x")]
    assert find_overlap(train, [{"text": "y", "source": "github:c/d:x.c"}]) == [("source", "github:c/d:x.c")]
    assert find_overlap(train, [{"text": "y", "title": "  book   ONE"}]) == [("title", "  book   ONE")]
    for name, recs in (("train", train), ("test", test)):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    check_disjoint([str(tmp_path / "train.jsonl")], [str(tmp_path / "test.jsonl")])
    with open(tmp_path / "test.jsonl", "a") as f:
        f.write(json.dumps({"text": "code", "title": "t"}) + "\n")
    with pytest.raises(ValueError, match=r"shares 1 document key\(s\) with the training data: text 't'"):
        check_disjoint([str(tmp_path / "train.jsonl")], [str(tmp_path / "test.jsonl")])

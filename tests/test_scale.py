"""`--memory-budget` and `--refine`: the layout chosen for a budget and its arithmetic, on-disk inverted lists
built in chunks and searched memory-mapped, edits that never write a saved version, and exact re-scoring."""

import hashlib
import json

import faiss
import numpy as np
import pytest
from conftest import MINI, copy_run

from cbir import CbirError
from cbir.cli import main
from cbir.retrieval.budget import choose_layout, parse_budget
from cbir.retrieval.faiss_store import LISTS_FILE
from cbir.retrieval.index import IndexConfig, build_index
from cbir.retrieval.ingest import add_photos, remove_images
from cbir.retrieval.saved import load_index


def test_the_budget_picks_the_most_accurate_layout_that_fits():
    n, dim = 10_000_000, 256
    assert choose_layout(n, dim, parse_budget("8G"), n).factory.endswith(",SQ8")
    assert not choose_layout(n, dim, parse_budget("8G"), n).on_disk
    in_ram = choose_layout(n, dim, parse_budget("2G"), n)
    assert in_ram.factory.endswith(",PQ64") and not in_ram.on_disk and "SQ8" in in_ram.reason
    on_disk = choose_layout(n, dim, parse_budget("512M"), n)
    assert on_disk.on_disk and on_disk.factory.endswith(",SQ8") and on_disk.ram_bytes < parse_budget("512M")
    assert on_disk.factory.startswith("IVF12649_HNSW32")  # 4 sqrt(n) lists, an HNSW graph over them
    assert choose_layout(50_000, dim, parse_budget("1G"), 50_000).factory == "Flat"
    # PQ codebooks need 256 x 39 training vectors: with fewer, the lists go to disk instead
    assert choose_layout(200_000, dim, parse_budget("30M"), 5_000).on_disk
    # at most one list per 39 training vectors
    assert choose_layout(10**6, dim, parse_budget("1G"), 3_900).factory.startswith("IVF100,")
    for text, value in (("4G", 4 * 2**30), ("512M", 512 * 2**20), ("2.5g", int(2.5 * 2**30)), ("1000", 1000)):
        assert parse_budget(text) == value
    for bad in ("4X", "-1G", "0", "G", ""):
        with pytest.raises(CbirError, match="--memory-budget"):
            parse_budget(bad)


@pytest.mark.parametrize("budget", ["1M", "200K"])
def test_the_estimate_is_what_faiss_holds(budget):
    """The layout's resident bytes against the real index's, built the way `cbir index` builds it."""
    n, dim = 40_000, 32
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, dim)).astype(np.float32)
    layout = choose_layout(n, dim, parse_budget(budget), n)
    index = faiss.index_factory(dim, layout.factory, faiss.METRIC_INNER_PRODUCT)
    index.train(x[:10_000])
    index.add_with_ids(x, np.arange(n))
    held = faiss.serialize_index(index).nbytes
    if layout.on_disk:  # the estimate's RAM part is the quantizer; the lists are what is on disk
        assert abs(layout.disk_bytes - held) / held < 0.15
    else:
        assert abs(layout.ram_bytes - held) / held < 0.15


def _digest(folder):
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in folder.iterdir()}


def _recall(a, b):
    return float(np.mean([len(set(x) & set(y)) / len(x) for x, y in zip(a, b)]))


def test_on_disk_lists_searched_mapped_edited_without_touching_a_saved_version(sample_run, tmp_path, capfd):
    run = copy_run(sample_run, tmp_path / "run")
    exact = build_index(IndexConfig(run=run, embeddings="det", name="exact", pca=64, factory="Flat"))
    si = build_index(IndexConfig(run=run, embeddings="det", name="disk", pca=64, memory_budget=8192))
    layout = si.manifest["layout"]
    assert layout["on_disk"] and "inverted lists on disk" in layout["reason"] and layout["budget"] == 8192
    queries = exact.raw_vectors(exact.table.index[exact.table.split == "test"].to_numpy()[:200])
    truth = exact.search(queries, 10)[1]
    plain = load_index(run, "disk")
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(plain.store.index).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists)  # mapped from the version's lists.ivfdata, not read
    assert plain.store.count == len(plain.table)
    assert np.array_equal(plain.search(queries, 10)[1], si.search(queries, 10)[1])
    assert _recall(plain.search(queries, 10)[1], truth) > 0.6
    # --refine: the shortlist re-scored exactly from the embeddings brings back exact search's answer
    refined = build_index(IndexConfig(run=run, embeddings="det", name="disk", pca=64, memory_budget=8192, refine=200))
    sims, ids = refined.search(queries, 10)
    assert _recall(ids, truth) >= 0.99 and np.all(np.diff(sims, axis=1) <= 1e-6)

    # edits copy the lists first: the saved version's files stay as they were, byte for byte
    saved = (run / "index" / "disk").resolve()
    before = _digest(saved)
    victim = int(refined.table.image_id.iloc[0])
    remove_images(run, "disk", [victim])
    assert _digest(saved) == before
    removed = (run / "index" / "disk").resolve()
    before = _digest(removed)
    photo = sorted((MINI / "images" / "014.Indigo_Bunting").glob("*.jpg"))[0]
    added, _, _ = add_photos(run, "disk", [photo], use_detector=False)
    assert added == 1 and _digest(removed) == before
    edited = load_index(run, "disk")
    assert (run / "index" / "disk").resolve() not in (saved, removed) and (run / "index" / "disk" / LISTS_FILE).is_file()
    assert victim not in set(edited.table.image_id) and edited.store.count == len(edited.table)
    new_id = int(edited.table.index[edited.table.split == "added"][0])
    assert edited.search(edited.raw_vectors(np.array([new_id])), 1)[1][0, 0] == new_id
    assert not list((run / ".staging").glob("faiss-lists-*"))  # no scratch left behind
    # FAISS reports on-disk work with printf; none of it may reach stdout, where --json answers go
    capfd.readouterr()
    image_id = int(edited.table.image_id[edited.table.split == "test"].iloc[0])
    code = main(["search", "--run", str(run), "--index", "disk", "--query-id", str(image_id), "--k", "3", "--json"])
    printed = capfd.readouterr()
    assert code in (0, None), printed.err[-500:]
    answer = json.loads(printed.out)
    assert answer["query"] == f"image_id {image_id}" and len(answer["boxes"][0]["neighbours"]) == 3
    # a rebuild replays both edits onto fresh lists and answers the same
    rebuilt = build_index(IndexConfig(run=run, embeddings="det", name="disk", pca=64, memory_budget=8192, refine=200,
                                      force=True))
    for a, b in zip(rebuilt.search(queries, 10), edited.search(queries, 10)):
        assert np.allclose(a, b, atol=1e-5)


def test_an_in_ram_layout_opens_memory_mapped_and_edits_a_copy(sample_run, tmp_path):
    run = copy_run(sample_run, tmp_path / "run")
    si = build_index(IndexConfig(run=run, embeddings="det", name="sq8", pca=64, memory_budget=200_000))
    assert si.manifest["factory"].endswith(",SQ8") and not si.manifest["layout"]["on_disk"]
    assert not (run / "index" / "sq8" / LISTS_FILE).exists()
    reader = load_index(run, "sq8")
    assert isinstance(faiss.downcast_InvertedLists(faiss.extract_index_ivf(reader.store.index).invlists),
                      faiss.OnDiskInvertedLists)  # IO_FLAG_MMAP: the lists are views of index.faiss
    queries = reader.raw_vectors(reader.table.index[:50].to_numpy())
    expected = si.search(queries, 5)
    assert np.array_equal(reader.search(queries, 5)[1], expected[1])
    saved = (run / "index" / "sq8").resolve()
    before = _digest(saved)
    remove_images(run, "sq8", [int(reader.table.image_id.iloc[-1])])
    assert _digest(saved) == before
    after = load_index(run, "sq8")
    assert after.store.count == len(after.table) == len(reader.table) - (reader.table.image_id ==
                                                                          reader.table.image_id.iloc[-1]).sum()


def test_budget_flags_refused_in_one_line(sample_run, tmp_path, capsys):
    run = copy_run(sample_run, tmp_path / "run")
    for flags, message in ((["--store", "milvus-lite:m.db"], "--memory-budget chooses a FAISS layout"),
                           (["--factory", "Flat"], "give one of them")):
        assert main(["index", "--run", str(run), "--embeddings", "det", "--name", "b", "--memory-budget", "1G",
                     *flags]) == 2
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (run / "index" / "b").exists()


def _rss_file_kb() -> int:
    return int(next(line for line in open("/proc/self/status") if line.startswith("RssFile")).split()[1])


def test_refine_reads_its_shortlist_rows_without_mapping_the_vectors_file(tmp_path):
    """--refine's rows come from the embeddings file by positioned reads: the same rows as indexing the map, in
    the order asked (repeats, any shape), and no page of the file is mapped into the process (indexing the map
    put 9.4 GB of a 10 GB file in the search's RSS at 10^7 vectors)."""
    from cbir.vectors import take_rows

    rng = np.random.default_rng(0)
    path = tmp_path / "vectors.npy"
    np.save(path, rng.standard_normal((40_000, 128), dtype=np.float32))  # 20 MB
    vectors = np.load(path, mmap_mode="r")
    ids = rng.integers(0, len(vectors), (300, 20))
    ids[0, :3] = [5, 5, len(vectors) - 1]
    before = _rss_file_kb()
    rows = take_rows(vectors, ids)
    assert _rss_file_kb() - before < 1024  # 6,000 random rows of 20 MB: indexing the map touches nearly all of it
    assert rows.shape == (300, 20, 128) and np.array_equal(rows, np.load(path)[ids])
    chunk = np.r_[np.arange(1000, 9000), np.arange(20_000, 20_003), 39_999]  # runs of consecutive rows: one read each
    assert np.array_equal(take_rows(vectors, chunk), np.load(path)[chunk])
    view = vectors[100:]  # a slice of the map starts elsewhere in the file: indexed, not read by offset
    assert np.array_equal(take_rows(view, ids[:5] % len(view)), np.asarray(view[ids[:5] % len(view)]))
    with pytest.raises(IndexError):
        take_rows(vectors, np.array([len(vectors)]))
    # a forked process (a server's worker) reads with threads of its own: its parent's do not exist there
    import multiprocessing

    child = multiprocessing.get_context("fork").Process(target=take_rows, args=(vectors, chunk))
    child.start()
    child.join(30)
    assert child.exitcode == 0, "take_rows hung or failed in a forked child"

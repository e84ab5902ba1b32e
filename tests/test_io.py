"""io: per-tensor model reading, PEFT adapter scaling as PEFT computes it, mixed-rank adapters
that PEFT loads, and the streamed full-model writer."""

from __future__ import annotations

import contextlib
import errno
import copy
import json
import math
import mmap
import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safemerge_ext.errors import SafeMergeError
from safemerge_ext.io import pagecache
from safemerge_ext.io.adapters import OutModule, pattern_key, read_adapter, unit_alpha, write_adapter
from safemerge_ext.io.model_writer import write_model
from safemerge_ext.io.models import ModelReader, natural_key
from numerics import assert_close
from weights import load_adapter, load_model


def test_reader_reads_only_what_is_asked(fx):
    r = ModelReader(fx.aligned, "--aligned")
    assert r.is_sharded and len(r.shards()) > 3
    names = r.names
    assert names.index("model.layers.2.mlp.up_proj.weight") < names.index("model.norm.weight")
    shape, dtype = r.meta("model.layers.0.self_attn.k_proj.weight")
    assert shape == (32, 64) and dtype == torch.float32  # GQA: 2 kv heads of 16
    assert r.bytes_read == 0  # headers only
    t = r.get("model.layers.1.mlp.down_proj.weight")
    assert t.shape == (64, 96) and r.bytes_read == 64 * 96 * 4
    assert torch.equal(t, load_model(fx.aligned)["model.layers.1.mlp.down_proj.weight"])


@pytest.mark.parametrize("output", ["adapter", "model"])
def test_each_weight_file_is_opened_once(fx, tmp_path, monkeypatch, output):
    """A run opens each shard of both models and each adapter file once: the header and the
    tensors are read through one descriptor."""
    import builtins
    from pathlib import Path

    from safemerge_ext.cli import main

    opened = []
    real_os_open, real_open = os.open, builtins.open

    def seen(path):
        if str(path).endswith(".safetensors") and not str(path).startswith(str(tmp_path)):
            opened.append(os.path.realpath(path))

    monkeypatch.setattr(os, "open", lambda path, *a, **k: (seen(path), real_os_open(path, *a, **k))[1])
    monkeypatch.setattr(builtins, "open", lambda path, *a, **k: (seen(path), real_open(path, *a, **k))[1])
    assert main(["merge", "--aligned", str(fx.aligned), "--unaligned", str(fx.unaligned), "--task-adapter",
                 str(fx.task), "--safety-adapter", str(fx.safety), "--out", str(tmp_path / "out"), "--output", output,
                 "--no-progress", "--no-plot"]) == 0
    aligned = {os.path.realpath(p) for p in Path(fx.aligned).glob("*.safetensors")}
    assert len(set(opened) & aligned) > 2 and (output == "adapter" or aligned <= set(opened))
    assert sorted(opened) == sorted(set(opened)), sorted(opened)


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists open files through /proc/self/fd")
def test_an_interrupt_as_a_shard_is_opened_leaves_it_closed(fx, monkeypatch):
    """CPython acts on a Ctrl-C as a call returns, before its result is stored: the descriptor a bare
    os.open returned then stayed open, owned by nothing, until the process ended (a notebook's model
    folder could not be deleted on Windows, review174). The file object the reader opens now is
    dropped with the interrupt, and closed."""
    import builtins

    from safemerge_ext import pipeline
    from safemerge_ext.io import models

    shard = sorted(Path(fx.aligned).glob("*.safetensors"))[0]

    def interrupted(path, *a, **k):  # (the file opened and returned, then the interrupt)
        f = builtins.open(path, *a, **k)
        if Path(path) == shard:
            raise KeyboardInterrupt
        return f

    def still_open() -> list[str]:
        names = []
        for fd in os.listdir("/proc/self/fd"):
            try:
                names.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                pass
        return [n for n in names if n == str(shard.resolve())]

    monkeypatch.setattr(models, "open", interrupted, raising=False)
    with pytest.raises(KeyboardInterrupt):
        pipeline.score(fx.aligned, fx.unaligned, fx.task)
    assert still_open() == []


def test_headers_are_read_whole_through_short_reads(fx, monkeypatch):
    """A file system that returns short reads (FUSE, some NFS set-ups) still gives whole headers."""
    from safemerge_ext.io import models

    real, calls = os.preadv, []
    monkeypatch.setattr(models.os, "preadv", lambda fd, bufs, off: calls.append(len(bufs[0])) or real(fd, [bufs[0][:64]], off))
    short = ModelReader(fx.aligned, "--aligned")
    got = {n: short.layout(n) for n in short.names}
    monkeypatch.undo()
    assert max(calls) > 64  # (headers longer than one short read)
    reader = ModelReader(fx.aligned, "--aligned")
    assert got == {n: reader.layout(n) for n in reader.names}


def test_too_many_open_files_says_to_raise_the_limit(fx, monkeypatch):
    """Out of file descriptors is not a corrupt download: the error says to raise the limit."""
    import errno

    from safemerge_ext.io import models

    def emfile(path, *a, **k):
        raise OSError(errno.EMFILE, "Too many open files", str(path))

    reader = ModelReader(fx.aligned, "--aligned")
    monkeypatch.setattr(models, "open", emfile, raising=False)  # (the reader's shard files)
    with pytest.raises(SafeMergeError, match=r"--aligned .*safetensors: cannot open it: too many open files .*ulimit -n"):
        reader.layout(reader.names[0])


def test_reader_maps_tensors_without_copying(fx):
    """map() is a view of the file's pages: equal to get(), counted in bytes_read, and private
    (writing to it never reaches the file)."""
    r = ModelReader(fx.aligned, "--aligned")
    ref = load_model(fx.aligned)
    for name in ("model.layers.1.mlp.down_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.norm.weight"):
        before = r.bytes_read
        r.will_need(name)
        t = r.map(name)
        assert t.shape == ref[name].shape and t.dtype == ref[name].dtype and torch.equal(t, ref[name])
        assert r.bytes_read - before == t.numel() * t.element_size()
    # is_mapped: only this reader's live mappings, never a copy (drop-behind relies on it)
    t = r.map(name)
    assert r.is_mapped(t) and r.is_mapped(t[1:]) and r.is_mapped(t.view(-1)[3:5])
    assert not r.is_mapped(t.clone()) and not r.is_mapped(r.get(name))
    assert not ModelReader(fx.aligned, "--aligned").is_mapped(t)
    del t
    import gc

    gc.collect()
    assert not r._maps, "a dead mapping stayed registered"
    t = r.map("model.layers.0.mlp.up_proj.weight")
    t.fill_(7.0)
    assert torch.equal(ModelReader(fx.aligned).get("model.layers.0.mlp.up_proj.weight"), ref["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT") or not hasattr(os, "posix_fadvise"), reason="needs Linux preadv2 flags")
def test_will_need_reads_into_the_page_cache(fx):
    """will_need() leaves the tensor's bytes in the page cache (a non-blocking read finds them
    there), not in the process."""
    r = ModelReader(fx.aligned, "--aligned")
    name = "model.layers.1.mlp.down_proj.weight"
    shard, (_, _, start, end) = r._entry(name)
    fd = os.open(fx.aligned / shard, os.O_RDONLY)
    buf = bytearray(end - start)

    def cached() -> bool:
        try:
            return os.preadv(fd, [buf], start, os.RWF_NOWAIT) == end - start
        except BlockingIOError:
            return False

    try:
        os.fsync(fd)  # clean pages can be dropped
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        # (asked without side effects where possible: a missed RWF_NOWAIT read starts read-ahead)
        before = pagecache.resident(fd, start, end)
        if before if before is not None else cached():
            pytest.skip("this file system keeps the file's pages when asked to drop them")
        r.will_need(name)
        assert cached()
        assert r.bytes_read == 0
    finally:
        os.close(fd)
        r.close()


def _dropped(path) -> int:
    """An fd of ``path`` with its pages dropped from the page cache (skips where they stay)."""
    fd = os.open(path, os.O_RDONLY)
    os.fsync(fd)  # clean pages can be dropped
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    if pagecache.resident(fd, 0, os.fstat(fd).st_size):
        os.close(fd)
        pytest.skip("this file system keeps the file's pages when asked to drop them")
    return fd


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_pagecache_resident_counts_cached_pages(tmp_path):
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(3 * 65536 + 100))
    fd = os.open(path, os.O_RDONLY)
    try:
        if pagecache.resident(fd, 0, 10) is None:
            pytest.skip("no cachestat on this kernel")
    finally:
        os.close(fd)
    fd = _dropped(path)
    try:
        assert pagecache.resident(fd, 0, 65536) is False
        os.pread(fd, 65536 + 1, 4096)  # pages 1..17 (and whatever read-ahead adds)
        assert pagecache.resident(fd, 4096, 65536 + 4097) is True
        assert pagecache.resident(fd, 4096, 65536 + 4096 + 1) is True
        assert pagecache.resident(fd, 5000, 5000) is True  # nothing to read
    finally:
        os.close(fd)


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="needs posix_fadvise")
def test_will_need_skips_bytes_already_cached(fx, monkeypatch):
    """A tensor whose pages are all in the page cache is not read again; one that is not, is."""
    r = ModelReader(fx.aligned, "--aligned")
    name = "model.layers.1.mlp.down_proj.weight"
    shard, (_, _, start, end) = r._entry(name)
    fd = _dropped(fx.aligned / shard)
    sends = []
    real = os.sendfile
    monkeypatch.setattr(os, "sendfile", lambda *a: sends.append(a) or real(*a))
    try:
        if pagecache.resident(fd, start, end) is None:
            pytest.skip("no cachestat on this kernel")
        r.will_need(name)
        assert sends and pagecache.resident(fd, start, end)
        sends.clear()
        r.will_need(name)
        assert sends == []
    finally:
        os.close(fd)
        r.close()


def test_will_need_falls_back_to_fadvise(fx, monkeypatch):
    """Where sendfile cannot write to /dev/null, will_need() asks posix_fadvise to start the read
    instead, and stops trying sendfile."""
    if not hasattr(os, "posix_fadvise"):
        pytest.skip("no posix_fadvise here")
    monkeypatch.setattr(pagecache, "resident", lambda fd, start, end: False)  # as if never cached
    sends, advice = [], []

    def no_sendfile(*args):
        sends.append(args)
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(os, "sendfile", no_sendfile)
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, offset, length, how: advice.append((offset, length, how)))
    r = ModelReader(fx.aligned, "--aligned")
    name = "model.layers.1.mlp.down_proj.weight"
    _, (_, _, start, end) = r._entry(name)
    r.will_need(name)
    r.will_need(name)
    assert len(sends) == 1
    assert advice == [(start, end - start, os.POSIX_FADV_WILLNEED)] * 2
    assert torch.equal(r.map(name), load_model(fx.aligned)[name])


def test_reader_map_falls_back_to_reading(fx, monkeypatch):
    """Where the file system cannot map files, map() reads the bytes instead."""
    import mmap as mmap_module

    def refuse(*args, **kwargs):
        raise OSError(19, "No such device")

    monkeypatch.setattr(mmap_module, "mmap", refuse)
    r = ModelReader(fx.aligned, "--aligned")
    name = "model.layers.1.mlp.gate_proj.weight"
    t = r.map(name)
    assert torch.equal(t, load_model(fx.aligned)[name])
    assert not r.is_mapped(t), "a copy read instead of a mapping must not pass for one"


def test_a_shard_cut_short_after_its_header_was_read_is_named(fx, tmp_path):
    """A shard truncated between the checks and the read (a re-download over it, say) is one line
    naming the file and the tensor, not mmap's "mmap length is greater than file size"."""
    import shutil

    model = Path(shutil.copytree(fx.aligned, tmp_path / "m"))
    r = ModelReader(model, "--aligned")
    name = "model.layers.1.mlp.gate_proj.weight"
    shard = model / r.shard_of(name)
    r.layout(name)  # (the header is read; then the file is cut inside the tensor)
    os.truncate(shard, r._entry(name)[1][2] + 16)
    with pytest.raises(SafeMergeError, match=rf"--aligned {re.escape(str(shard))}: file ended inside tensor {name}; re-download it"):
        r.map(name)


@pytest.mark.parametrize("way", ["copy_file_range", "sendfile", "buffered"])
def test_copy_into_appends_the_tensor_bytes(tmp_path, monkeypatch, way):
    """copy_into appends a tensor's bytes at the output's position, byte for byte, by each way of
    copying (the ones before it made unavailable), counts them as read, and names a tensor that
    the file cuts short."""
    from safemerge_ext.io import models
    from safemerge_ext.io.safetensors_stream import StreamingWriter

    g = torch.Generator().manual_seed(11)
    tensors = {"a": torch.randn(3, 5, generator=g), "b": torch.randn(700, 130, generator=g).bfloat16(),
               "c": torch.arange(7, dtype=torch.int64)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    ways = ["copy_file_range", "sendfile", "buffered"]
    if ways.index(way) > 0:  # as some file systems do: copy nothing, no error
        monkeypatch.setattr(os, "copy_file_range", lambda *a: 0, raising=False)
    if ways.index(way) > 1:  # as a kernel without it does

        def enosys(*args):
            raise OSError(errno.ENOSYS, "Function not implemented")

        monkeypatch.setattr(os, "sendfile", enosys)
    used = []
    real = {"copy_file_range": models._copy_file_range, "sendfile": models._sendfile, "buffered": models._copy_buffered}
    monkeypatch.setattr(models, {"copy_file_range": "_copy_file_range", "sendfile": "_sendfile",
                                 "buffered": "_copy_buffered"}[way],
                        lambda *a: used.append(way) or real[way](*a))
    r = ModelReader(tmp_path)
    names = sorted(tensors)
    out = tmp_path / "out"
    out.mkdir()
    with StreamingWriter(out / "model.safetensors", [(n, *r.meta(n)) for n in names]) as w:
        w.write("a", r.get("a"))  # a write through the descriptor, then kernel copies after it
        w.copy_from("b", r)
        w.copy_from("c", r)
    got = load_file(str(out / "model.safetensors"))
    assert all(torch.equal(got[n], tensors[n]) for n in names)
    assert used == [way, way] and r.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
    with pytest.raises(ValueError, match="expected c"):
        with StreamingWriter(out / "x.safetensors", [(n, *r.meta(n)) for n in ("c",)]) as w:
            w.copy_from("a", r)
    # a file cut short inside a tensor after its header was read
    cut = tmp_path / "cut"
    cut.mkdir()
    (cut / "model.safetensors").write_bytes((tmp_path / "model.safetensors").read_bytes())
    rc = ModelReader(cut, "--aligned")
    assert [rc.meta(n) for n in names]
    os.truncate(cut / "model.safetensors", (cut / "model.safetensors").stat().st_size - 40)
    fd = os.open(out / "y.bin", os.O_WRONLY | os.O_CREAT)
    try:
        with pytest.raises(SafeMergeError, match="file ended inside tensor"):
            for n in names:
                rc.copy_into(n, fd)
    finally:
        os.close(fd)


def test_rows_read_and_written_in_parts(tmp_path):
    """get_rows reads only the rows asked for; write_parts takes a tensor as row blocks and
    refuses parts that do not add up to it."""
    from safemerge_ext.io.safetensors_stream import StreamingWriter

    w = torch.randn(10, 3, 4, generator=torch.Generator().manual_seed(3)).bfloat16()
    save_file({"w": w, "x": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path)
    assert torch.equal(r.get_rows("w", 2, 7), w[2:7]) and r.bytes_read == 5 * 3 * 4 * 2
    assert r.get_rows("w", 4, 4).shape == (0, 3, 4)
    with pytest.raises(ValueError, match="rows"):
        r.get_rows("w", 8, 11)
    out = tmp_path / "o"
    out.mkdir()
    with StreamingWriter(out / "a.safetensors", [("w", w.shape, w.dtype)]) as sw:
        sw.write_parts("w", w.shape, w.dtype, (w[i:i + 3] for i in range(0, 10, 3)))
    assert torch.equal(load_file(str(out / "a.safetensors"))["w"], w)
    for parts, match in (((w[:4], w[4:9]), "hold 216 bytes, not 240"), ((w, w[:1]), "hold 264 bytes, not 240"),
                         ((w.float(),), "not torch.bfloat16")):
        with pytest.raises(ValueError, match=match):
            with StreamingWriter(out / "b.safetensors", [("w", w.shape, w.dtype)]) as sw:
                sw.write_parts("w", w.shape, w.dtype, parts)


def test_map_runs_groups_tensors_that_lie_back_to_back(tmp_path):
    """map_runs() maps runs of same-dtype tensors that follow each other in the file, capped in
    bytes, and its flat views hold exactly those tensors' values."""
    torch.manual_seed(3)
    tensors = {f"f{i}": torch.randn(16, 8) for i in range(6)}  # 512 B each
    tensors.update({"h0": torch.randn(4, 4).half(), "h1": torch.randn(3).half()})
    save_file(tensors, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path, "--model")
    runs = list(r.map_runs(tensors, max_bytes=3 * 512))
    assert sorted(n for names, _ in runs for n in names) == sorted(tensors)
    for names, flat in runs:
        assert len({tensors[n].dtype for n in names}) == 1
        assert torch.equal(flat, torch.cat([tensors[n].flatten() for n in names]))
        assert len(names) == 1 or flat.numel() * flat.element_size() <= 3 * 512
    assert [len(names) for names, flat in runs if flat.dtype == torch.float32] == [3, 3]
    assert r.bytes_read == sum(t.numel() * t.element_size() for t in tensors.values())
    # tensors with others between them in the file are runs of their own
    assert [names for names, _ in r.map_runs(["f0", "f2"])] == [["f0"], ["f2"]]


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_read_adapter_names_the_factor_that_is_not_finite(tmp_path, bad):
    """The factors are checked a run at a time, and the error names the one factor that failed,
    wherever it lies in the file (here in the second of two 1 MiB runs)."""
    torch.manual_seed(4)
    tensors = {}
    for i in range(6):  # lora_A 256 KiB each
        key = f"base_model.model.model.layers.{i}.self_attn.v_proj"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = torch.randn(4, 16384), torch.randn(16, 4)
    tensors["base_model.model.model.layers.4.self_attn.v_proj.lora_A.weight"][2, 7] = bad
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    with pytest.raises(SafeMergeError, match=r"model\.layers\.4\.self_attn\.v_proj\.lora_A contains NaN or Inf"):
        read_adapter(tmp_path, "--task-adapter")


@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=["e4m3fn", "e5m2"])
def test_float8_adapters_are_checked_and_scored(fx, tmp_path, dtype):
    """float8 factors (which torch cannot min/max) are checked on an fp32 copy of each run, and
    scored as the values they hold; a NaN among them is named."""
    from numerics import ref_cosine

    from safemerge_ext import pipeline

    src = load_file(str(fx.task / "adapter_model.safetensors"))
    fp8 = {k: v.float().to(dtype) for k, v in src.items()}
    ad = tmp_path / "fp8"
    ad.mkdir()
    (ad / "adapter_config.json").write_text((fx.task / "adapter_config.json").read_text())
    save_file(fp8, str(ad / "adapter_model.safetensors"))
    task = read_adapter(ad, "--task-adapter")
    run = pipeline.open_run(fx.aligned, fx.unaligned, task)
    scores = pipeline.score_layers(run, progress=False)
    wa, wu = load_model(fx.aligned), load_model(fx.unaligned)
    for layer, score in zip(run.layers, scores):
        A, B = (fp8[f"base_model.model.{layer.module}.lora_{x}.weight"].double() for x in "AB")
        want = ref_cosine(wa[layer.weight], wu[layer.weight], B @ A)
        assert abs(score.cosine - want) <= 1e-5, layer.module

    key = sorted(fp8)[5]
    fp8[key] = fp8[key].float()
    fp8[key][0, 1] = float("nan")
    fp8[key] = fp8[key].to(dtype)
    save_file(fp8, str(ad / "adapter_model.safetensors"))
    module, factor = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
    with pytest.raises(SafeMergeError, match=rf"{module}\.{factor} contains NaN or Inf"):
        read_adapter(ad, "--task-adapter")


def test_float8_adapters_merge_into_an_fp32_adapter(fx, tmp_path):
    """Merging float8 adapters (torch.promote_types refuses float8) writes each flagged module's
    factors in fp32: the exact linear merge of the values the float8 factors hold."""
    from safemerge_ext import pipeline
    from safemerge_ext.selection import Selection

    ads = []
    for src, name in ((fx.task, "task"), (fx.safety, "safety")):
        fp8 = {k: v.float().to(torch.float8_e4m3fn) for k, v in load_file(str(src / "adapter_model.safetensors")).items()}
        (tmp_path / name).mkdir()
        (tmp_path / name / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
        save_file(fp8, str(tmp_path / name / "adapter_model.safetensors"))
        ads.append(fp8)
    out = tmp_path / "out"
    report = pipeline.merge(fx.aligned, fx.unaligned, tmp_path / "task", tmp_path / "safety", out,
                            pipeline.MergeSettings(Selection(threshold=1.0), alpha=0.25), progress=False, plot=False)
    flagged = [rec for rec in report["layers"] if rec["flagged"]]
    assert flagged
    merged = load_adapter(out)  # (tests/weights: scalings from the configs, not the package's reader)
    task, safety = load_adapter(tmp_path / "task"), load_adapter(tmp_path / "safety")
    for rec in flagged:
        A, B, s = merged[rec["module"]]
        assert A.dtype == B.dtype == torch.float32
        (At, Bt, st), (As, Bs, ss) = task[rec["module"]], safety[rec["module"]]
        want = 0.25 * st * Bt.double() @ At.double() + 0.75 * ss * Bs.double() @ As.double()
        torch.testing.assert_close(s * B.double() @ A.double(), want, rtol=1e-5, atol=1e-6)


def test_large_tensors_are_mapped_in_whole_huge_pages(tmp_path, monkeypatch):
    """A tensor of a huge page or more is mapped from the huge-page boundary at or below its start
    to the one at or above its end, cut at the end of the file, so huge folios in the page cache
    map whole: its values are the file's wherever it lies (first, between others, last)."""
    from safemerge_ext.io import models

    monkeypatch.setattr(models, "_PMD", 64 * 1024)  # small "huge pages": the same logic on small files
    torch.manual_seed(3)
    # b starts 12 KB into the file, past a 4 KiB page boundary; b and d span more than 64 KiB
    tensors = {"a": torch.randn(3000), "b": torch.randn(130, 131), "c": torch.randn(5), "d": torch.randn(129, 133)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    size = (tmp_path / "model.safetensors").stat().st_size
    r = ModelReader(tmp_path)
    for name, want in tensors.items():
        t = r.map(name)
        assert torch.equal(t, want) and r.is_mapped(t)
        lo, hi = next(iter(r._maps.values()))
        _, (_, _, start, end) = r._entry(name)
        if want.numel() * 4 >= models._PMD:
            assert start % models._PMD != start % 4096 and end % models._PMD
            assert (t.data_ptr() - lo) == start % models._PMD, f"{name}: the mapping does not start on a huge page"
            assert hi - lo == min(end + (-end) % models._PMD, size) - (start - start % models._PMD)
        else:
            assert hi == t.data_ptr() + t.numel() * 4, f"{name}: a small tensor was widened"
        del t
        import gc

        gc.collect()
    assert r.bytes_read == sum(t.numel() * 4 for t in tensors.values())


def test_huge_page_size_is_read_from_the_system_and_large_ones_turn_widening_off(tmp_path, monkeypatch):
    from pathlib import Path

    from safemerge_ext.io import models

    def answer(text):
        def read_text(self, *a, **k):
            if isinstance(text, Exception):
                raise text
            return text
        return read_text

    for text, want in (("2097152\n", 2 << 20), ("65536", 65536), ("33554432", 0), ("536870912", 0),
                       (OSError("no sysfs"), 2 << 20), ("garbage", 2 << 20)):
        monkeypatch.setattr(Path, "read_text", answer(text))
        assert models._pmd_size() == want, text
    monkeypatch.undo()
    monkeypatch.setattr(models, "_PMD", 0)
    w = torch.randn(600, 1000)  # 2.4 MB, mapped as it lies
    save_file({"a": torch.randn(7), "w": w}, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path)
    t = r.map("w")
    lo, hi = next(iter(r._maps.values()))
    assert torch.equal(t, w) and hi == t.data_ptr() + w.numel() * 4 and t.data_ptr() - lo < mmap.ALLOCATIONGRANULARITY


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="maps memory at a chosen address with libc")
def test_memory_at_a_just_unmapped_address_is_not_taken_for_a_mapping(tmp_path, monkeypatch):
    """CPython unmaps an mmap before the weakref callbacks that take its range out of the registry
    run. Memory allocated in that window at the same address (here: by a callback that runs in it)
    must not count as file-backed, or the kernels' drop-behind would zero it."""
    import ctypes
    import gc
    import weakref

    from safemerge_ext import _mapped

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype, libc.mmap.argtypes = ctypes.c_void_p, [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int,
                                                              ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    MAP_FIXED_NOREPLACE = 0x100000
    made = []
    add = _mapped.add
    monkeypatch.setattr(_mapped, "add", lambda mm, lo, hi: made.append((weakref.ref(mm), lo, hi)) or add(mm, lo, hi))
    w = torch.randn(300, 700)
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    t = ModelReader(tmp_path).map("w")
    (ref, lo, hi), seen = made[0], {}
    offset = t.data_ptr() - lo

    def in_the_window():  # runs after the munmap, before the reader's own callback
        seen["registered"] = any(v[0] == lo for v in _mapped._live.values())
        size = hi - lo
        addr = libc.mmap(lo, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                         | MAP_FIXED_NOREPLACE, -1, 0)
        if addr != lo:
            seen["error"] = f"mmap at {lo:#x} gave {addr!r}, errno {ctypes.get_errno()}"
            return
        try:
            fresh = torch.frombuffer((ctypes.c_char * size).from_address(lo), dtype=torch.float32, offset=offset,
                                     count=w.numel()).view(300, 700)
            fresh.fill_(1.5)
            seen["covered"] = _mapped.covers(fresh)
        finally:
            libc.munmap(lo, size)

    weakref.finalize(ref(), in_the_window)
    del t
    gc.collect()
    assert "error" not in seen, seen.get("error")
    assert seen["registered"], "the window was not reached: the registry entry was gone before the callback"
    assert seen["covered"] is False, "fresh memory at a just-unmapped address was taken for a live file mapping"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_mapped_pages_leave_the_resident_set_with_the_tensor(tmp_path):
    """A mapped tensor's pages count in RSS once touched and leave it when the tensor is dropped:
    what keeps the pipeline's memory at one layer pair."""

    def rss_file_kb() -> int:
        return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith("RssFile")))

    w = torch.randn(2048, 1024)  # 8 MiB
    save_file({"w": w}, str(tmp_path / "model.safetensors"))
    r = ModelReader(tmp_path)
    want = float(w.double().sum())  # (first use: torch's code pages for it are file pages too)
    base = rss_file_kb()
    t = r.map("w")
    assert float(t.double().sum()) == want
    touched = rss_file_kb() - base
    del t
    left = rss_file_kb() - base
    assert touched > 7 * 1024, f"touching 8 MiB of mapped pages added only {touched} KiB to RSS"
    assert left < 1024, f"{left} KiB of the dropped tensor's pages are still resident"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_adapter_factors_are_read_when_used_and_written_one_module_at_a_time(tmp_path):
    """read_adapter checks every factor but keeps none in memory, and write_adapter makes and writes
    one module's factors at a time: neither grows the resident set by the adapter's size."""

    def status_kb(key: str) -> int:
        return int(next(ln.split()[1] for ln in open("/proc/self/status") if ln.startswith(key + ":")))

    torch.manual_seed(5)
    d, r, n = 2048, 256, 8  # per module: A 256x2048 and B 2048x256 in fp32, 4 MiB; 32 MiB in all
    tensors, config = {}, {"peft_type": "LORA", "r": r, "lora_alpha": 2 * r}
    for i in range(n):
        key = f"base_model.model.model.layers.{i}.self_attn.q_proj"
        tensors[f"{key}.lora_A.weight"], tensors[f"{key}.lora_B.weight"] = torch.randn(r, d), torch.randn(d, r)
    src = tmp_path / "ad"
    src.mkdir()
    save_file(tensors, str(src / "adapter_model.safetensors"))
    (src / "adapter_config.json").write_text(json.dumps(config))

    read_adapter(src)  # the first call's torch code pages and allocator arenas are not the adapter's
    base = status_kb("VmRSS")
    adapter = read_adapter(src)
    held = status_kb("VmRSS") - base
    assert adapter.nbytes == 32 << 20 and len(adapter.modules) == n
    assert held < 4 << 10, f"an opened 32 MiB adapter holds {held} KiB"
    m = adapter.modules["model.layers.3.self_attn.q_proj"]
    assert (m.rank, m.d_out, m.d_in, m.scaling) == (r, d, d, 2.0)
    assert torch.equal(m.A, tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight"])
    assert torch.equal(m.B, tensors["base_model.model.model.layers.3.self_attn.q_proj.lora_B.weight"])

    try:
        with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS
            f.write("5")
        base = status_kb("VmRSS")
    except OSError:  # (sandboxes such as gVisor: the peak cannot be reset, so it is not checked)
        base = None
    write_adapter(tmp_path / "out", config, [OutModule.from_lora(m) for m in adapter.modules.values()])
    if base is not None:
        peak = status_kb("VmHWM") - base
        assert peak < 12 << 10, f"writing a 32 MiB adapter raised peak RSS by {peak} KiB"
    got = load_file(tmp_path / "out" / "adapter_model.safetensors")
    assert got.keys() == tensors.keys() and all(torch.equal(got[k], t) for k, t in tensors.items())
    assert read_adapter(tmp_path / "out").modules["model.layers.7.self_attn.q_proj"].scaling == 2.0


def test_reader_single_file(tmp_path):
    save_file({"a.weight": torch.randn(3, 4), "b": torch.randn(2)}, tmp_path / "model.safetensors")
    r = ModelReader(tmp_path)
    assert not r.is_sharded and set(r.names) == {"a.weight", "b"}
    assert r.resolve_module("a") == "a.weight" and r.resolve_module("zz") is None
    assert r.get("b").shape == (2,)


def test_natural_order():
    names = ["model.layers.10.q", "model.layers.2.q", "model.layers.1.q", "model.layers.1.fc2", "model.layers.1.fc1"]
    assert sorted(names, key=natural_key) == ["model.layers.1.fc1", "model.layers.1.fc2", "model.layers.1.q",
                                              "model.layers.2.q", "model.layers.10.q"]


def test_numbers_inside_name_parts_sort_as_numbers():
    names = ["m.h_10.w", "m.h_2.w", "x.experts.w10", "x.experts.w2", "model.tok_embeddings.weight", "model.norm.weight",
             "model.layers.0.attention.wqkv.weight"]
    assert sorted(names, key=natural_key) == [
        "model.tok_embeddings.weight", "model.layers.0.attention.wqkv.weight", "m.h_2.w", "m.h_10.w",
        "model.norm.weight", "x.experts.w2", "x.experts.w10"]  # (outside the blocks: by name)


@pytest.mark.parametrize("stored", ["language_model.model.layers.0.self_attn.q_proj.weight",  # Gemma 3, LLaVA files
                                    "model.layers.0.self_attn.q_proj.weight"])  # Qwen2-VL's files
def test_vision_language_names_resolve_to_the_stored_tensor(tmp_path, stored):
    """PEFT names a vision-language model's text modules model.language_model.layers...; the files
    store them otherwise. Both namings find the tensor, and a name two tensors could answer finds none."""
    save_file({stored: torch.randn(4, 4), "vision_tower.vision_model.q.weight": torch.randn(2, 2)},
              tmp_path / "model.safetensors")
    r = ModelReader(tmp_path)
    assert r.resolve_module("model.language_model.layers.0.self_attn.q_proj") == stored
    assert r.resolve_module("language_model.model.layers.0.self_attn.q_proj") == stored
    assert r.resolve_module("model.vision_tower.vision_model.q") == "vision_tower.vision_model.q.weight"
    assert r.resolve_module("model.vision_tower.q") == "vision_tower.vision_model.q.weight"  # (transformers 5's name)
    assert r.resolve_module("model.language_model.layers.1.self_attn.q_proj") is None
    both = tmp_path / "both"
    both.mkdir()
    save_file({"language_model.model.layers.0.q.weight": torch.randn(2, 2), "model.layers.0.q.weight": torch.randn(2, 2)},
              both / "model.safetensors")
    assert ModelReader(both).resolve_module("model.language_model.layers.0.q") is None


@pytest.mark.parametrize("arch", ["llama", "gpt_neox", "phi3"])
def test_natural_order_is_the_order_models_define(arch):
    """Sorting the weight names of a model gives the order transformers defines them in: the
    embeddings, the blocks (each block's linear layers as the model runs them), the final norm, the
    output head; checked on every weight outside the blocks and every linear weight inside them."""
    import random

    import transformers

    common = dict(vocab_size=64, hidden_size=32, num_attention_heads=4, num_hidden_layers=11,
                  intermediate_size=48, tie_word_embeddings=False)
    model = {
        "llama": lambda: transformers.LlamaForCausalLM(transformers.LlamaConfig(num_key_value_heads=2, **common)),
        "gpt_neox": lambda: transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**common)),
        # (fused qkv_proj and gate_up_proj, and o_proj defined before qkv_proj)
        "phi3": lambda: transformers.Phi3ForCausalLM(transformers.Phi3Config(num_key_value_heads=2, pad_token_id=0,
                                                                             **common)),
    }[arch]()
    linear = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    want = [n for n, _ in model.named_parameters()
            if n.endswith(".weight") and (n in linear or not any(p.isdigit() for p in n.split(".")))]
    got = list(want)
    random.Random(0).shuffle(got)
    assert sorted(got, key=natural_key) == want


def test_pattern_key_matches_peft():
    from peft.utils.other import get_pattern_key

    patterns = ["v_proj", "model.layers.1.self_attn.q_proj", r"layers\.2\..*o_proj"]
    for module in ["model.layers.0.self_attn.v_proj", "model.layers.1.self_attn.q_proj", "model.layers.11.self_attn.q_proj",
                   "model.layers.2.self_attn.o_proj", "model.layers.3.self_attn.o_proj", "model.layers.0.mlp.up_proj"]:
        ours = pattern_key(patterns, module)
        theirs = get_pattern_key(patterns, module)
        assert (ours if ours is not None else module) == theirs, module


def test_adapter_scaling_equals_peft(fx):
    """rank_pattern, alpha_pattern and rsLoRA give the same scaling PEFT itself uses."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    for path in (fx.task, fx.safety):
        ours = read_adapter(path).modules
        model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(fx.aligned), path)
        seen = 0
        for name, mod in model.named_modules():
            if hasattr(mod, "scaling") and isinstance(mod.scaling, dict) and "default" in mod.scaling:
                key = name.removeprefix("base_model.model.")
                assert math.isclose(ours[key].scaling, mod.scaling["default"], rel_tol=1e-12), key
                assert torch.equal(ours[key].A, mod.lora_A["default"].weight.detach())
                seen += 1
        assert seen == len(ours) == 21
    task = read_adapter(fx.task).modules
    assert task["model.layers.0.self_attn.v_proj"].rank == 2 and task["model.layers.0.self_attn.o_proj"].alpha == 3.0


def test_modules_of_mixed_ranks_and_scalings_are_written_at_one_rank_and_scaling(fx, tmp_path):
    """Each module's update is written as given, but all at the largest rank (zero-padded) and the
    template's default scaling, with no rank_pattern/alpha_pattern: vLLM reads only r and lora_alpha,
    llama.cpp scales each tensor by lora_alpha over its own rank, TGI/LoRAX stack a module's factors
    across layers (a merge's mixed ranks were mis-scaled or failed there, review169). PEFT loads it
    and folds each module's update as given."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    template = json.loads((fx.task / "adapter_config.json").read_text())
    assert template["rank_pattern"] and template["alpha_pattern"]  # (which the written adapter must not keep)
    ad = read_adapter(fx.task)
    torch.manual_seed(3)
    mods, want = [], {}
    for i, (name, m) in enumerate(ad.modules.items()):
        r = 1 + i % 11  # ranks 1..11 across modules, including names like layers.1 and layers.11
        A, B = torch.randn(r, m.d_in), torch.randn(m.d_out, r)
        rsl = i % 2 == 0
        mods.append(OutModule.of(name, A, B, unit_alpha(r, rsl) if rsl else 2.0 * r))
        want[name] = mods[-1].alpha / r * (B.double() @ A.double())
    # unit_alpha gives scaling exactly 1 under both rules
    assert all(unit_alpha(r, u) / (math.sqrt(r) if u else r) == 1.0 for r in range(1, 300) for u in (True, False))
    # use_rslora=False: the rsLoRA-style alphas give scaling sqrt(r)/r, which the default does not.
    # The template's init scheme is not kept: PEFT's orthogonal init refuses odd ranks when loading.
    write_adapter(tmp_path / "ad", {**template, "use_rslora": False, "init_lora_weights": "orthogonal"}, mods)
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["init_lora_weights"] is True and config["rank_pattern"] == {} == config["alpha_pattern"]
    default = template["lora_alpha"] / template["r"]
    assert config["r"] == 11 and math.isclose(config["lora_alpha"] / 11, default, rel_tol=1e-12)
    written = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    for name, update in want.items():
        A, B = (written[f"base_model.model.{name}.lora_{f}.weight"] for f in "AB")
        assert A.shape[0] == B.shape[1] == 11, name  # (llama.cpp's rank: each tensor's own)
        assert_close(default * (B.double() @ A.double()), update, atol=1e-5, rtol=1e-5, what=name)
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(fx.aligned), tmp_path / "ad")
    seen = set()
    for name, mod in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in want and hasattr(mod, "lora_A"):
            assert mod.lora_A["default"].weight.shape[0] == 11, key
            assert math.isclose(mod.scaling["default"], default, rel_tol=1e-12), key
            got = mod.scaling["default"] * (mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double())
            assert_close(got, want[key], atol=1e-5, rtol=1e-5, what=key)
            seen.add(key)
    assert seen == set(want)


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
def test_per_module_ranks_are_written_as_patterns_peft_reads(fx, tmp_path, rslora):
    """ranks="per-module": each module at its own rank (1..11 across modules, names like layers.1 and
    layers.11 among them), the most common one the default, the others through rank_pattern and
    alpha_pattern at the template's one scaling; PEFT builds every module at its rank and folds its
    update as given."""
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    template = {**json.loads((fx.task / "adapter_config.json").read_text()), "use_rslora": rslora}
    ad = read_adapter(fx.task)
    torch.manual_seed(4)
    mods, want = [], {}
    for i, (name, m) in enumerate(ad.modules.items()):
        r = 3 if i % 3 == 0 else 1 + i % 11
        A, B = torch.randn(r, m.d_in), torch.randn(m.d_out, r)
        mods.append(OutModule.of(name, A, B, 1.5 * r))
        want[name] = (r, mods[-1].alpha / (math.sqrt(r) if rslora else r) * (B.double() @ A.double()))
    write_adapter(tmp_path / "ad", template, mods, ranks="per-module")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 3 and len(config["rank_pattern"]) == sum(r != 3 for r, _ in want.values())
    default = template["lora_alpha"] / (math.sqrt(template["r"]) if rslora else template["r"])
    written = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    assert {n: written[f"base_model.model.{n}.lora_A.weight"].shape[0] for n in want} == {n: r for n, (r, _) in want.items()}
    model = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(fx.aligned), tmp_path / "ad")
    seen = set()
    for name, mod in model.named_modules():
        key = name.removeprefix("base_model.model.")
        if key in want and hasattr(mod, "lora_A"):
            assert mod.lora_A["default"].weight.shape[0] == want[key][0], key
            assert math.isclose(mod.scaling["default"], default, rel_tol=1e-12), key
            got = mod.scaling["default"] * (mod.lora_B["default"].weight.double() @ mod.lora_A["default"].weight.double())
            assert_close(got, want[key][1], atol=1e-5, rtol=1e-5, what=key)
            seen.add(key)
    assert seen == set(want)


def test_a_vlm_adapter_peft_loads_under_transformers_renaming_is_not_refused(tmp_path):
    """Qwen2-VL's files name the text model model.layers..., transformers and the adapters PEFT
    trains on it model.language_model.layers..., which PEFT loads through transformers' renaming:
    the model+lora check refused it as a name PEFT would not load (review185). A bare model's names
    (layers...) are still refused."""
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from safemerge_ext.io.adapters import check_peft_loads_factors

    torch.manual_seed(0)
    cfg = Qwen2VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=128, rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2, in_chans=3, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2))
    model = Qwen2VLForConditionalGeneration(cfg)
    model.save_pretrained(tmp_path / "base")
    get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(
        tmp_path / "lora")
    reader = ModelReader(tmp_path / "base", "model")
    assert "model.layers.0.self_attn.q_proj.weight" in reader.names
    adapter = read_adapter(tmp_path / "lora", "lora", folded=True)
    assert "model.language_model.layers.0.self_attn.q_proj" in adapter.modules
    check_peft_loads_factors(adapter, reader, "role task")
    factors = load_file(tmp_path / "lora" / "adapter_model.safetensors")
    save_file({k.replace("base_model.model.model.language_model.", "base_model.model."): v
               for k, v in factors.items()}, str(tmp_path / "lora" / "adapter_model.safetensors"))
    with pytest.raises(SafeMergeError, match="the model names that module model.layers.0.self_attn.q_proj, not layers"):
        check_peft_loads_factors(read_adapter(tmp_path / "lora", "lora", folded=True), reader, "role task")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_a_checkpoint_stored_without_its_base_model_prefix_is_what_peft_loads(tmp_path, fmt):
    """The Hub's gpt2 stores h.0.attn.c_attn.weight, which transformers loads as transformer.h.0...
    (GPT2LMHeadModel's base_model_prefix), and PEFT's adapters name the module so: PEFT folds them,
    and the model+lora check refused them as factors PEFT would not load (review203)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    from safemerge_ext.io.adapters import check_peft_loads_factors
    from safemerge_ext.io.models import base_model_prefix, open_model

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=64, n_positions=32))
    model.save_pretrained(tmp_path / "base")
    st = tmp_path / "base" / "model.safetensors"
    tensors = {k.removeprefix("transformer."): v for k, v in load_file(st).items()}
    st.unlink()
    _save_checkpoint(tensors, tmp_path / "base", fmt)
    lora = LoraConfig(r=2, target_modules=["c_attn", "c_fc"], fan_in_fan_out=True, init_lora_weights=False)
    get_peft_model(copy.deepcopy(model.transformer), lora).save_pretrained(tmp_path / "bare-lora")
    get_peft_model(model, lora).save_pretrained(tmp_path / "lora")
    assert base_model_prefix(tmp_path / "base") == "transformer"
    with open_model(tmp_path / "base") as reader:
        assert "h.0.attn.c_attn.weight" in reader.names
        check_peft_loads_factors(read_adapter(tmp_path / "lora", "lora", folded=True), reader, "role task")
        # one saved from the bare GPT2Model names it h.0.attn.c_attn, which PEFT does not load there (review204)
        with pytest.raises(SafeMergeError, match=r"the model names that module transformer\.h\.0\.attn\.c_attn, "
                                                 r"not h\.0\.attn\.c_attn, so PEFT would fold"):
            check_peft_loads_factors(read_adapter(tmp_path / "bare-lora", "lora", folded=True), reader, "role task")
    # on a checkpoint that stores the prefix, a doubled one (transformer.transformer.h...) is refused as before
    _save_checkpoint({f"transformer.{k}": v for k, v in tensors.items()}, tmp_path / "base", fmt)
    doubled = tmp_path / "doubled"
    shutil.copytree(tmp_path / "lora", doubled)
    weights = doubled / "adapter_model.safetensors"
    save_file({k.replace(".transformer.", ".transformer.transformer."): v for k, v in load_file(weights).items()},
              str(weights))
    with open_model(tmp_path / "base") as reader:
        check_peft_loads_factors(read_adapter(tmp_path / "lora", "lora", folded=True), reader, "role task")
        with pytest.raises(SafeMergeError, match=r"the model names that module transformer\.h\.0\.attn\.c_attn, not "
                                                 r"transformer\.transformer\.h\.0\.attn\.c_attn"):
            check_peft_loads_factors(read_adapter(doubled, "lora", folded=True), reader, "role task")


def test_a_written_adapter_spells_peft_type_as_peft_reads_it(tmp_path):
    """An input config with peft_type "lora" (read here in any case) was copied to the written
    adapter, which PEFT then could not load (KeyError: 'lora'; review184)."""
    from peft import PeftConfig

    torch.manual_seed(7)
    mods = [OutModule.of("model.layers.0.self_attn.q_proj", torch.randn(2, 8), torch.randn(8, 2), 2.0)]
    write_adapter(tmp_path / "ad", {"peft_type": "lora", "r": 2, "lora_alpha": 2, "target_modules": ["q_proj"]}, mods)
    assert json.loads((tmp_path / "ad" / "adapter_config.json").read_text())["peft_type"] == "LORA"
    assert PeftConfig.from_pretrained(str(tmp_path / "ad")).peft_type == "LORA"


def test_per_module_rank_patterns_tell_apart_a_name_that_ends_with_another(tmp_path):
    """PEFT matches a pattern key against the end of a module's name, the first key that matches
    winning: a module at the default rank whose name ends with another module's name (y.x.q_proj,
    x.q_proj) gets a key of its own, ahead of the shorter one, so each module gets its own rank as
    PEFT's own lookup resolves it."""
    from peft.utils.other import get_pattern_key

    torch.manual_seed(6)
    ranks = {"x.q_proj": 2, "y.x.q_proj": 4, "z.q_proj": 4, "w.q_proj": 4, "v.y.x.q_proj": 2}
    mods = [OutModule.of(n, torch.randn(r, 8), torch.randn(8, r), float(r)) for n, r in ranks.items()]
    write_adapter(tmp_path / "ad", {"r": 4, "lora_alpha": 4}, mods, ranks="per-module")
    config = json.loads((tmp_path / "ad" / "adapter_config.json").read_text())
    assert config["r"] == 4
    for name, r in ranks.items():
        key = get_pattern_key(config["rank_pattern"].keys(), name)
        assert config["rank_pattern"].get(key, config["r"]) == r, (name, key, config["rank_pattern"])
        akey = get_pattern_key(config["alpha_pattern"].keys(), name)
        assert config["alpha_pattern"].get(akey, config["lora_alpha"]) == r, name


@pytest.mark.parametrize("rslora", [False, True], ids=["lora", "rslora"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.float8_e4m3fn])
def test_at_rank_keeps_the_update_at_another_rank_and_scaling(rslora, dtype):
    """at_rank pads A with zero rows and B with zero columns and folds the change of scaling into
    B: scaling * B @ A is the module's own (in float64, up to B's rounding once rescaled in fp32);
    at the module's own scaling B keeps its dtype and values (float8 becomes fp32, which PEFT can
    stack with other modules)."""
    from safemerge_ext.io.adapters import alpha_for, at_rank

    g = torch.Generator().manual_seed(11)
    A, B = torch.randn(3, 10, generator=g).to(dtype), torch.randn(7, 3, generator=g).to(dtype)
    m = OutModule.of("model.layers.0.block_sparse_moe.gate", A, B, alpha=alpha_for(0.5, 3, rslora))
    want = 0.5 * B.double() @ A.double()
    for scaling, rank in ((0.5, 8), (2.0, 8), (2.0, 3)):
        out = at_rank(m, rank, alpha_for(scaling, rank, rslora), rslora)
        A2, B2 = out.make()
        assert out.rank == rank and A2.shape == (rank, 10) == out.shape_A and B2.shape == (7, rank) == out.shape_B
        kept = torch.float32 if dtype == torch.float8_e4m3fn else dtype
        assert (A2.dtype, B2.dtype) == out.dtypes and A2.dtype == kept
        assert torch.equal(A2[:3], A.to(kept)) and not A2[3:].any() and not B2[:, 3:].any()
        if scaling == 0.5:
            assert B2.dtype == kept and torch.equal(B2[:, :3], B.to(kept))
        else:
            assert B2.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
        got = out.alpha / unit_alpha(rank, rslora) * B2.double() @ A2.double()
        assert_close(got, want, atol=1e-12, rtol=1e-6, what=f"scaling {scaling}, rank {rank}")
    huge = at_rank(OutModule.of("m", A.float(), B.float() * 1e30, alpha=alpha_for(1e9, 3, rslora)), 8,
                   alpha_for(1e-9, 8, rslora), rslora)
    with pytest.raises(SafeMergeError, match=r"^module m: its lora_B overflows torch.float32 \(Inf\)"):
        huge.make()


@pytest.mark.parametrize("patch_bytes", [8 << 20, 4 * 64 * 5], ids=["one-block", "blocks-of-5-rows"])
def test_model_writer_streams_and_copies(fx, fx_bf16, tmp_path, monkeypatch, patch_bytes):
    """Dense and low-rank updates are added in fp32 a block of rows at a time (blocks of 5 rows
    leave a partial last block) and rounded once; every other tensor is copied unchanged."""
    from safemerge_ext.io import model_writer

    monkeypatch.setattr(model_writer, "PATCH_BYTES", patch_bytes)
    g = torch.Generator().manual_seed(5)
    dense, B, A = torch.randn(64, 64, generator=g), torch.randn(96, 3, generator=g), torch.randn(3, 64, generator=g)
    updates = {"model.layers.1.self_attn.q_proj.weight": dense, "model.layers.0.mlp.up_proj.weight": (B, A)}
    for i, src_dir in enumerate((fx.aligned, fx_bf16.aligned)):
        r = ModelReader(src_dir)
        out = tmp_path / f"o{i}"
        out.mkdir()
        write_model(r, out, updates.get)
        got, src = load_model(out), load_model(src_dir)
        assert set(got) == set(src)
        for k in src:
            if k in updates:
                u = dense.double() if k.endswith("q_proj.weight") else B.double() @ A.double()
                want = src[k].double() + u
                # fp32 sums, rounded once: to within fp32's or bf16's half ulp (row blocks of a
                # low-rank product may round differently from the whole product)
                rtol = 0.0 if src[k].dtype == torch.float32 else 2.0**-8
                assert got[k].dtype == src[k].dtype
                assert_close(got[k], want, atol=1e-6 * float(want.abs().max()), rtol=rtol, what=k)
            else:
                assert torch.equal(got[k], src[k]), k
        assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in src_dir.glob("*.safetensors"))
        assert (out / "config.json").is_file() and (out / "model.safetensors.index.json").is_file()
    (tmp_path / "bad").mkdir()
    with pytest.raises(SafeMergeError, match="factors"):
        write_model(ModelReader(fx.aligned), tmp_path / "bad", lambda n: (B[:64], A) if n in updates else None)


def test_model_writer_checks_a_bounded_distance_ahead(fx, tmp_path, monkeypatch):
    """The NaN/Inf check of copied tensors reads ahead of the writer by LOOKAHEAD_BYTES at most (its
    pages are still cached when the copy reads them), however slow the writer; every floating
    tensor is still checked once."""
    import time

    from safemerge_ext.io import model_writer

    reader = ModelReader(fx.aligned)
    order = [n for names in reader.shards(as_stored=True).values() for n in names]
    sizes = [reader.layout(n)[2] for n in order]
    start = dict(zip(order, [sum(sizes[:i]) for i in range(len(order))]))
    budget = 2 * max(sizes)
    assert sum(sizes) > 4 * budget  # (the model is long enough for the bound to matter)
    monkeypatch.setattr(model_writer, "LOOKAHEAD_BYTES", budget)
    written, scans = [], []
    real = ModelReader.scan_finite
    monkeypatch.setattr(ModelReader, "scan_finite",
                        lambda self, name, buf=None: scans.append((name, len(written))) or real(self, name, buf))
    out = tmp_path / "out"
    out.mkdir()
    write_model(reader, out, lambda n: None, on_tensor=lambda n: (written.append(n), time.sleep(0.003)))
    assert written == order
    assert sorted(n for n, _ in scans) == sorted(n for n in order if reader.holds_floats(n))
    end = {n: start[n] + size for n, size in zip(order, sizes)}
    for name, k in scans:  # (the writer was at order[k] when the check of name began)
        assert end[name] <= start[order[k]] + budget or name == order[k], (name, order[k])


def _raw_safetensors(path, header: dict, data: bytes) -> None:
    """A safetensors file written by hand (for headers the library would refuse to write)."""
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(len(blob).to_bytes(8, "little") + blob + data)


@pytest.mark.parametrize("header, culprit", [
    ({"a": {"dtype": "F32", "shape": [4], "data_offsets": [0, 24]}}, "tensor a (F32 [4]) spans 24 bytes, not 16"),
    ({"a": {"dtype": "BF16", "shape": [2, 3], "data_offsets": [0, 24]}}, "spans 24 bytes, not 12"),
    ({"a": {"dtype": "F32", "shape": [-1, 6], "data_offsets": [0, 24]}}, "tensor a has shape [-1, 6]"),
    (["not", "a", "table"], "the header is not a JSON object"),
], ids=["f32-size", "bf16-size", "negative-dim", "not-an-object"])
def test_reader_refuses_headers_whose_bytes_do_not_match(tmp_path, header, culprit):
    """A header whose byte range does not fit the tensor's shape and dtype is refused when read,
    in one line, instead of reshaping the wrong bytes or copying them into a broken output."""
    _raw_safetensors(tmp_path / "model.safetensors", header, bytes(24))
    with pytest.raises(SafeMergeError) as err:
        ModelReader(tmp_path).names
    assert culprit in str(err.value) and "model.safetensors" in str(err.value) and "\n" not in str(err.value)


def test_model_writer_keeps_every_dtype_and_the_shard_metadata(tmp_path):
    """Tensors in any safetensors dtype pass through --output model byte for byte (torch needs no
    dtype for a copied tensor, and has none for F4), and each shard keeps its __metadata__."""
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir(), out.mkdir()
    w = torch.randn(4, 6)
    header = {
        "__metadata__": {"format": "pt", "quantization": '{"group_size": 64}'},
        "a.weight": {"dtype": "F32", "shape": [4, 6], "data_offsets": [0, 96]},
        "b.u32": {"dtype": "U32", "shape": [3], "data_offsets": [96, 108]},
        "c.f4": {"dtype": "F4", "shape": [4, 2], "data_offsets": [108, 112]},
        "d.odd": {"dtype": "X9", "shape": [5], "data_offsets": [112, 117]},  # unknown: size taken from the file
    }
    tail = bytes(range(21))
    _raw_safetensors(src / "model.safetensors", header, w.numpy().tobytes() + tail)
    r = ModelReader(src)
    assert r.meta("b.u32") == ((3,), torch.uint32) and r.layout("c.f4") == ((4, 2), "F4", 4)
    assert r.metadata("model.safetensors") == header["__metadata__"]
    dW = torch.randn(4, 6)
    write_model(r, out, lambda n: dW if n == "a.weight" else None)
    got = ModelReader(out)
    assert got.metadata("model.safetensors") == header["__metadata__"]
    assert {n: got.layout(n) for n in got.names} == {n: r.layout(n) for n in r.names}
    assert torch.equal(got.get("a.weight"), w + dW)
    raw = (out / "model.safetensors").read_bytes()
    assert raw.endswith(tail)  # b, c and d, byte for byte


def test_index_shard_names_must_be_files_in_the_folder(fx, tmp_path):
    import shutil

    model = tmp_path / "m"
    shutil.copytree(fx.aligned, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    shutil.copy(model / index["weight_map"][name], tmp_path / "outside.safetensors")
    index["weight_map"][name] = "../outside.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafeMergeError, match=r"lists shard '\.\./outside\.safetensors', which is not a file name"):
        ModelReader(model)


def test_staged_output_is_all_or_nothing(tmp_path):
    """The output folder gets the umask's mode (not mkdtemp's 0700); an --out that appears while a
    run writes is left alone without --force and replaced with it; a failed run leaves nothing,
    not even the parent folders it made."""
    from safemerge_ext.io.output import staged_dir

    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "a", force=False) as tmp:
            (tmp / "f").write_text("x")
    finally:
        os.umask(old)
    assert (tmp_path / "a" / "f").read_text() == "x" and (tmp_path / "a").stat().st_mode & 0o777 == 0o755
    with pytest.raises(SafeMergeError, match="appeared while this run was writing; nothing was replaced"):
        with staged_dir(tmp_path / "b", force=False) as tmp:
            (tmp / "f").write_text("new")
            (tmp_path / "b").mkdir()
            (tmp_path / "b" / "theirs").write_text("keep")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["theirs"]
    with staged_dir(tmp_path / "b", force=True) as tmp:
        (tmp / "f").write_text("new")
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["f"]
    # another --force run's output put in place between this one's two renames (old aside, new in)
    import safemerge_ext.io.output as output

    real = output._put_in_place

    def racing(tmp, final, *a, **k):
        real_rename = Path.rename

        def rename(self, target):
            if self == tmp:
                final.mkdir()
                (final / "theirs").write_text("B")
            return real_rename(self, target)
        Path.rename = rename
        try:
            return real(tmp, final, *a, **k)
        finally:
            Path.rename = real_rename
    output._put_in_place = racing
    try:
        with pytest.raises(SafeMergeError, match=r"b was written by another run while this one replaced it; this run's "
                                                 r"output is not kept, and the output it moved aside is at .*\.b\.old-"):
            with staged_dir(tmp_path / "b", force=True) as tmp:
                (tmp / "f").write_text("A")
    finally:
        output._put_in_place = real
    assert [p.name for p in (tmp_path / "b").iterdir()] == ["theirs"]
    (aside,) = [p for p in tmp_path.iterdir() if p.name.startswith(".b.old-")]
    assert [p.name for p in aside.iterdir()] == ["f"] and (aside / "f").read_text() == "new"
    shutil.rmtree(aside)
    shutil.rmtree(tmp_path / "b")
    with staged_dir(tmp_path / "b", force=True) as tmp:
        (tmp / "f").write_text("new")
    with pytest.raises(RuntimeError):
        with staged_dir(tmp_path / "x" / "y" / "c", force=False):
            raise RuntimeError("the run failed")
    assert not (tmp_path / "x").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b"]  # no temporaries or backups left
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")  # refused before the run, not after it
    with pytest.raises(SafeMergeError, match="already exists"):
        staged_dir(tmp_path / "dangling", force=False).__enter__()


def test_windows_syncs_through_a_handle_that_may_write(tmp_path, monkeypatch):
    """Windows' fsync is FlushFileBuffers, which fails on a read-only handle (and the failure is
    one _fsync lets pass): there the file is opened for writing, and read-only only where it must be."""
    from safemerge_ext.io import output

    real_open, real_fsync, opened, synced = os.open, os.fsync, [], []

    def fake_open(path, flags, *rest):
        opened.append((os.path.basename(path), flags & (os.O_RDONLY | os.O_WRONLY | os.O_RDWR)))
        if flags & os.O_RDWR and os.path.basename(path) == "read-only":
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, flags, *rest)

    for name in ("shard", "read-only"):
        (tmp_path / name).write_bytes(b"x")
    monkeypatch.setattr(os, "open", fake_open)
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    monkeypatch.setattr(os, "name", "nt")
    output._fsync(tmp_path / "shard")
    output._fsync(tmp_path / "read-only")
    output._fsync(tmp_path)  # (Windows opens no folder)
    monkeypatch.undo()
    assert opened == [("shard", os.O_RDWR), ("read-only", os.O_RDWR), ("read-only", os.O_RDONLY)]
    assert len(synced) == 2


def test_macos_syncs_past_the_drives_cache(tmp_path, monkeypatch):
    """macOS' fsync leaves the data in the drive's write cache, which a power loss empties: there
    each file is flushed with F_FULLFSYNC, and with fsync only where the file system lacks it."""
    import fcntl

    from safemerge_ext.io import output

    calls = []
    real_fsync = os.fsync
    (tmp_path / "shard").write_bytes(b"x")
    monkeypatch.setattr(fcntl, "F_FULLFSYNC", 51, raising=False)  # (darwin's value; Linux has none)

    def fake_fcntl(fd, cmd, *rest):
        calls.append(("fcntl", cmd))
        if len(calls) > 1:
            raise OSError(errno.ENOTSUP, "Operation not supported")
        return 0
    monkeypatch.setattr(fcntl, "fcntl", fake_fcntl)
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append(("fsync",)), real_fsync(fd))[1])
    monkeypatch.setattr(sys, "platform", "darwin")
    output._fsync(tmp_path / "shard")
    output._fsync(tmp_path / "shard")  # (F_FULLFSYNC refused this time)
    monkeypatch.undo()
    assert calls == [("fcntl", 51), ("fcntl", 51), ("fsync",)]


def test_staged_output_is_on_disk_before_it_is_published(tmp_path, monkeypatch):
    """Every file and folder of the output is synced before the rename that publishes it, and the
    rename (the parent folder) before --force deletes the output it replaced."""
    from safemerge_ext.io import output

    events: list[tuple[str, str]] = []
    real_fsync = output._fsync
    monkeypatch.setattr(output, "_fsync", lambda p: (events.append(("sync", str(p))), real_fsync(p))[1])
    real_remove = output._remove_replaced
    monkeypatch.setattr(output, "_remove_replaced",
                        lambda old, final, flag, *rest: (events.append(("remove", old.name)),
                                                         real_remove(old, final, flag, *rest))[1])
    out = tmp_path / "out"
    out.mkdir()
    (out / "previous").write_text("old")
    with output.staged_dir(out, force=True) as tmp:
        (tmp / "sub").mkdir()
        for rel in ("a.safetensors", "config.json", "sub/tokenizer.json"):
            (tmp / rel).write_text(rel)
        (tmp / "link").symlink_to(tmp / "config.json")
    want = {os.path.normpath(tmp / rel) for rel in ("a.safetensors", "config.json", "sub/tokenizer.json", "sub", ".")}
    assert {os.path.normpath(p) for kind, p in events[:len(want)] if kind == "sync"} == want  # (not the link)
    assert events[len(want):] == [("sync", str(tmp_path)), ("remove", events[-1][1])]
    assert sorted(p.name for p in out.iterdir()) == ["a.safetensors", "config.json", "link", "sub"]
    events.clear()
    with output.staged_dir(tmp_path / "new" / "deep" / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    after = [p for kind, p in events if kind == "sync"][-3:]  # (the folders made for it, with their entries)
    assert after == [str(tmp_path / "new" / "deep"), str(tmp_path / "new"), str(tmp_path)]


def test_files_written_into_go_before_files_replaced(tmp_path, monkeypatch):
    """A pipe or device is written into before any file is renamed into place: when it fails (a
    full device, a pipe whose reader went away), the files stay as they were."""
    import errno as errno_

    from safemerge_ext.io import output

    plot, fifo = tmp_path / "p.png", tmp_path / "fifo"
    plot.write_text("old")
    os.mkfifo(fifo)

    def full(tmp, path):
        raise OSError(errno_.ENOSPC, "No space left on device")

    monkeypatch.setattr(output, "_write_into", full)
    with pytest.raises(OSError, match="No space left"):
        output.write_files([(plot, lambda t: t.write_text("new")), (fifo, lambda t: t.write_text("{}"))])
    assert plot.read_text() == "old" and fifo.is_fifo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fifo", "p.png"]


def test_what_a_killed_run_left_is_named(tmp_path, capsys):
    """A killed run's hidden siblings (partial output, or the output a --force run moved aside) are
    named on the next run for the same output, and left where they are."""
    from safemerge_ext.io.output import staged_dir

    left = [tmp_path / ".out.tmp-0a1b2c3d", tmp_path / ".out.old-99887766"]
    for p in left:
        p.mkdir()
    (tmp_path / ".out.tmp-mine").mkdir()  # (not a name the runs make)
    (tmp_path / ".other.tmp-0a1b2c3d").mkdir()
    with staged_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(p.is_dir() for p in left)
    line = {p: next(ln for ln in err if str(p) in ln) for p in left}
    assert "a partial output" in line[left[0]] and "--out" in line[left[0]] and "killed" in line[left[0]]
    assert "the output an earlier run for --out" in line[left[1]]
    assert "did not delete (it was killed, or was denied)" in line[left[1]]


def test_a_finished_output_a_killed_run_left_is_not_called_partial(tmp_path, capsys):
    """SIGKILL between --force's two renames (the old output moved aside, the new one not yet in
    place) leaves the new output whole, report written, in .out.tmp-<hex>: the next run called it
    "a partial output ... delete it" (review182). It says it is finished, and how to keep it."""
    from safemerge_ext.io.output import staged_dir

    done, partial = tmp_path / ".out.tmp-0a1b2c3d", tmp_path / ".out.tmp-99887766"
    for p in (done, partial):
        p.mkdir()
        (p / "adapter_model.safetensors").write_bytes(b"x")
    (done / "safemerge_report.json").write_text("{}")
    with staged_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2
    line = {p: next(ln for ln in err if str(p) in ln) for p in (done, partial)}
    assert line[done] == (f"safemerge: warning: {done} holds the finished output (its report written) of an earlier "
                          f"run for --out {tmp_path / 'out'} that was killed as it put it in place; rename it to keep "
                          "it, or delete it")
    assert "a partial output" in line[partial]
    assert (done / "safemerge_report.json").is_file() and partial.is_dir()


@pytest.mark.parametrize("appeared", ["folder", "file", "output", "empty"])
def test_force_never_deletes_what_appeared_at_out_during_the_run(tmp_path, capsys, appeared):
    """--force replaces an earlier output or an empty folder, never a folder of other files: the
    check ran only as the run started, so a folder another program made at --out while the run
    worked (a download, a copy) was deleted at the end, exit 0 (review186). What appeared is looked
    at once moved aside: a folder of other files or a file stays, and nothing is replaced."""
    from safemerge_ext.io.output import staged_dir

    out = tmp_path / "out"
    refuse = appeared in ("folder", "file")
    with pytest.raises(SafeMergeError) if refuse else contextlib.nullcontext() as refused:
        with staged_dir(out, force=True, marker="safemerge_report.json") as tmp:
            (tmp / "adapter_model.safetensors").write_text("new")
            if appeared == "file":
                out.write_text("mine")
            else:
                out.mkdir()
                if appeared != "empty":
                    (out / ("safemerge_report.json" if appeared == "output" else "thesis.txt")).write_text("mine")
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["out"]  # (no temporary, no folder moved aside)
    if refuse:
        why = " (no safemerge_report.json in it)" if appeared == "folder" else ""
        assert str(refused.value) == (
            f"--out {out} appeared while this run was writing and is no earlier output{why}: --force would delete "
            "all of it, so nothing was replaced; remove it yourself or choose another path")
        if appeared == "file":
            assert out.read_text() == "mine"
        else:
            assert sorted(p.name for p in out.iterdir()) == ["thesis.txt"] and (out / "thesis.txt").read_text() == "mine"
    else:
        assert sorted(p.name for p in out.iterdir()) == ["adapter_model.safetensors"]
    assert capsys.readouterr().err == ""


def test_a_second_run_for_an_output_being_written_is_refused(tmp_path, capsys):
    """Two --force runs writing one output at once both said they wrote it (the first one's output
    deleted by the second), and each called the other's live temporary a killed run's leftover, to
    be renamed or deleted (review186). A run holds its temporary (a lock the system drops when the
    process dies): a second run for the output is refused as it starts writing, naming the first,
    whose output is then put in place; a live run's folder is never named as a leftover."""
    from safemerge_ext.io.output import staged_dir

    out = tmp_path / "out"
    with staged_dir(out, force=True) as first:
        (first / "safemerge_report.json").write_text("{}")  # (finished: the report is written last)
        for force in (True, False):
            with pytest.raises(SafeMergeError) as refused:
                with staged_dir(out, force=force) as second:
                    pytest.fail("a second run wrote into the output")
            assert str(refused.value) == (f"--out {out}: another run is writing it now (in {first}); wait for it to "
                                          "finish (then pass --force to replace its output), or choose another path")
        assert capsys.readouterr().err == ""  # (the first run's temporary is no leftover)
        assert sorted(p.name for p in tmp_path.iterdir()) == [first.name]  # (the second's taken back)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "safemerge_report.json").is_file()
    with staged_dir(out, force=True) as second:  # (once the first is done, --force replaces its output)
        (second / "f").write_text("x")
    assert sorted(p.name for p in out.iterdir()) == ["f"] and capsys.readouterr().err == ""
    from safemerge_ext.io import output

    assert output._held == {}  # (every folder held let go: the temporaries, the output moved aside)


def test_a_run_refused_for_an_output_being_written_names_the_other_run_s_folder_as_it_was_given(
        tmp_path, monkeypatch):
    """A run refused at its start (check_out) named the other run's temporary by its absolute path,
    and one refused as it starts writing by the path as given (review193): both say it as given."""
    from safemerge_ext.io.output import check_out, staged_dir

    monkeypatch.chdir(tmp_path)
    for given in ("out", "sub/out", str(tmp_path / "abs")):
        with staged_dir(given, force=True) as first:
            want = (f"--out {given}: another run is writing it now (in {first}); wait for it to finish (then pass "
                    "--force to replace its output), or choose another path")
            assert first.is_absolute() == Path(given).is_absolute()
            with pytest.raises(SafeMergeError) as at_start:
                check_out(given, force=True)
            with pytest.raises(SafeMergeError) as writing:
                with staged_dir(given, force=True):
                    pytest.fail("a second run wrote into the output")
            assert str(at_start.value) == str(writing.value) == want


def test_two_runs_that_start_writing_at_once_one_goes_on(tmp_path, monkeypatch):
    """Two runs that started writing one output at the same moment each saw the other's temporary
    and both were refused (review188: 4 of 30): each lets go and looks again once, after a random
    moment, so that one of them writes the output and the other is refused. (Both have passed the
    check at the start, and each holds its temporary before either looks: the moment made exact.)"""
    import threading

    from safemerge_ext.io import output

    real_hold, real_check_out = output.hold, output.check_out
    for round_ in range(4):
        out = tmp_path / f"out{round_}"
        both_checked, both_held = threading.Barrier(2), threading.Barrier(2)
        first = threading.local()
        results: list[str] = []

        def check_out(*args, **kwargs):
            checked = real_check_out(*args, **kwargs)
            both_checked.wait(timeout=10)
            return checked

        def hold(folder):
            real_hold(folder)
            if not getattr(first, "done", False):
                first.done = True
                both_held.wait(timeout=10)

        monkeypatch.setattr(output, "hold", hold)
        monkeypatch.setattr(output, "check_out", check_out)

        def run(tag: str) -> None:
            try:
                with output.staged_dir(out, force=True) as tmp:
                    (tmp / "f").write_text(tag)
                    time.sleep(0.5)  # (still writing when the other looks again)
                results.append("wrote")
            except SafeMergeError as exc:
                results.append("refused" if "another run is writing it now" in str(exc) else str(exc))

        threads = [threading.Thread(target=run, args=(t,)) for t in "ab"]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(results) == ["refused", "wrote"], results
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(f".out{round_}")) == []
    assert output._held == {}


def test_a_forked_child_does_not_hold_its_parents_temporary(tmp_path):
    """A child forked inside a run (a library caller's multiprocessing worker) kept the run's lock
    after the parent was killed, and every later run was refused (review188): the child closes
    its copies; the parent's hold stays."""
    from safemerge_ext.io import output

    with output.staged_dir(tmp_path / "out", force=False) as tmp:
        pid = os.fork()
        if pid == 0:  # (the child: nothing held here, and closing its copies left the parent's lock)
            os._exit(0 if output._held == {} else 1)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert output._live(tmp) and str(tmp) in output._held


def test_a_name_cut_short_is_not_taken_for_another_outputs(tmp_path):
    """Names near the limit are cut short in their temporaries, so two outputs can share a prefix
    (review188): a run for one is not refused while a run for the other writes."""
    from safemerge_ext.io import output

    a, b = tmp_path / ("x" * 250 + "_a"), tmp_path / ("x" * 250 + "_b")
    with output.staged_dir(a, force=False) as tmp:
        (tmp / "f").write_text("a")
        with output.staged_dir(b, force=False) as other:
            (other / "f").write_text("b")
    assert (a / "f").read_text() == "a" and (b / "f").read_text() == "b"


def test_a_killed_processes_temporary_is_named_a_leftover(tmp_path, capsys):
    """The lock that marks a live run's temporary goes with the process, however it ends: a
    temporary a killed process held is named as a leftover again, and refuses no run."""
    import subprocess
    import sys

    code = ("import sys, time; from safemerge_ext.io.output import staged_dir\n"
            "with staged_dir(sys.argv[1], force=False) as tmp:\n"
            "    print(tmp, flush=True); time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True)
    try:
        held = Path(proc.stdout.readline().strip())
        assert held.is_dir()
        from safemerge_ext.io.output import _live

        assert _live(held)
    finally:
        proc.kill()
        proc.wait()
    proc.stdout.close()
    assert not _live(held)
    from safemerge_ext.io.output import staged_dir

    with staged_dir(tmp_path / "out", force=False) as tmp:
        (tmp / "f").write_text("x")
    assert f"{held} holds a partial output of an earlier run for --out" in capsys.readouterr().err
    assert held.is_dir()

    from safemerge_ext.io.output import let_go, scratch_dir

    folds = scratch_dir(tmp_path / "next", "lora")  # (safemerge-yaml's LoRA folds: held alike)
    with staged_dir(tmp_path / "next", force=False) as tmp:
        (tmp / "f").write_text("x")
    assert capsys.readouterr().err == ""
    let_go(folds)
    with staged_dir(tmp_path / "next", force=True) as tmp:
        (tmp / "f").write_text("x")
    assert f"{folds} holds the LoRA inputs folded by mergekit" in capsys.readouterr().err


def test_a_killed_runs_leftovers_are_named_before_already_exists(tmp_path, capsys):
    """A rerun without --force onto an output that exists still names what a killed --force run
    left beside it (the refusal is where the user reads; review130 left this open)."""
    from safemerge_ext.io.output import staged_dir

    (tmp_path / "out").mkdir()
    (tmp_path / ".out.old-0a1b2c3d").mkdir()
    with pytest.raises(SafeMergeError, match="already exists"):
        with staged_dir(tmp_path / "out", force=False):
            pass
    err = capsys.readouterr().err
    assert f"{tmp_path / '.out.old-0a1b2c3d'} holds the output an earlier run for --out" in err


def test_a_killed_runs_file_temporaries_are_named(tmp_path, capsys):
    """Files written whole (score's --report and --plot) name the temporaries a killed run left
    beside them (``.p.png.tmp-<hex>.png``), and leave them; other names are not taken for them."""
    from safemerge_ext.io.output import write_files

    left = {tmp_path / ".p.png.tmp-0a1b2c3d.png": tmp_path / "p.png", tmp_path / ".r.json.tmp-99887766.json": tmp_path / "r.json"}
    others = [tmp_path / ".p.png.tmp-0a1b2c3d.json", tmp_path / ".p.png.tmp-mine.png", tmp_path / ".q.png.tmp-0a1b2c3d.png"]
    for p in [*left, *others]:
        p.write_text("partial")
    write_files([(tmp_path / "p.png", lambda t: t.write_text("png")), (tmp_path / "r.json", lambda t: t.write_text("{}"))],
                prog="safemerge")
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 2 and all(p.exists() for p in [*left, *others])
    for p, final in left.items():
        line = next(ln for ln in err if str(p) in ln)
        assert line.startswith("safemerge: warning:") and f"a partial output of an earlier run for {final} that" in line
    write_files([(tmp_path / "p.png", lambda t: t.write_text("png"))])  # (without prog: a library call, silent)
    assert capsys.readouterr().err == ""


def test_a_fifo_named_as_a_temporary_is_not_waited_on(tmp_path, capsys):
    """Whether a run holds a temporary is asked by opening it: a FIFO of that name (no run made it)
    is not waited on (an open for reading blocks until a writer comes), and is named as left."""
    import threading

    from safemerge_ext.io.output import write_files

    fifo = tmp_path / ".r.json.tmp-0a1b2c3d.json"
    os.mkfifo(fifo)
    writing = threading.Thread(target=write_files, args=([(tmp_path / "r.json", lambda t: t.write_text("{}"))],),
                               kwargs={"prog": "safemerge"}, daemon=True)
    writing.start()
    writing.join(timeout=20)
    assert not writing.is_alive()
    assert (tmp_path / "r.json").read_text() == "{}"
    assert f"{fifo} holds a partial output" in capsys.readouterr().err


@pytest.mark.parametrize("stem", ["r" * 250, "é" * 122 + "r"])  # 250 and 245 + 5 bytes: valid names
def test_outputs_near_the_file_name_limit(tmp_path, stem):
    """A valid name near the 255-byte limit still gets a temporary (and a backup) beside it."""
    from safemerge_ext.io.output import staged_dir, write_whole

    write_whole(tmp_path / f"{stem[:-5]}.json", lambda tmp: tmp.write_text("{}"))
    for force in (False, True):  # (the second replaces the first: a backup name as well)
        with staged_dir(tmp_path / stem, force=force) as tmp:
            (tmp / "f").write_text(str(force))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem[:-5]}.json", stem])
    assert (tmp_path / stem / "f").read_text() == "True"
    long_suffix = tmp_path / ("r." + "x" * 245)  # (a suffix longer than the room left for it)
    write_whole(long_suffix, lambda tmp: tmp.write_text("{}"))
    assert long_suffix.read_text() == "{}"


def test_force_never_replaces_a_folder_with_a_file_system_mounted_inside(fx, tmp_path, monkeypatch, capsys):
    """An input bind-mounted inside an old --out has another path than the input's, so only the
    mount table shows it; --force refuses such an --out (its deletion would empty the input), and a
    mount that appears during the run keeps the replaced output rather than deleting across it.
    Mount points as the kernel writes them (octal escapes: a space is \\040)."""
    import shutil
    import subprocess

    from safemerge_ext.cli import main
    from safemerge_ext.io import output

    out = tmp_path / "old out"
    (out / "m").mkdir(parents=True)
    (out / "safemerge_report.json").write_text("{}")
    table = tmp_path / "mountinfo"
    esc = str(out / "m").replace(" ", "\\040")
    table.write_text(f"22 1 8:1 / / rw - ext4 /dev/sda1 rw\n98 22 8:1 /tmp/x {esc} rw,relatime - ext4 /dev/sda1 rw\n")
    monkeypatch.setattr(output, "_MOUNTINFO", str(table))
    assert output.mounts_under(out) == [str(out / "m")] and output.mounts_under(out / "m") == []
    with pytest.raises(SafeMergeError, match=f"--out {re.escape(str(out))} has {re.escape(str(out / 'm'))} mounted "
                                             "inside it, whose files --force would delete; unmount it"):
        output.check_out(out, force=True)
    output.check_out(tmp_path / "new", force=True)  # (nothing there)
    old = tmp_path / ".old-copy"
    shutil.copytree(out, old)
    monkeypatch.setattr(output, "_MOUNTINFO", str(table).replace("mountinfo", "none"))  # (no table: a walk)
    assert output.mounts_under(out) == []
    table.write_text(table.read_text().replace(esc, str(old / "m").replace(" ", "\\040")))
    monkeypatch.setattr(output, "_MOUNTINFO", str(table))
    output._remove_replaced(old, out, "--out")
    assert "the old output could not be removed" in capsys.readouterr().err and (old / "m").is_dir()
    monkeypatch.undo()
    # a real bind mount where this test may make one (root, a mount namespace that allows it)
    src = Path(shutil.copytree(fx.task, tmp_path / "task"))
    target = tmp_path / "out2" / "m"
    target.mkdir(parents=True)
    (target.parent / "safemerge_report.json").write_text("{}")
    if subprocess.run(["mount", "--bind", str(src), str(target)], capture_output=True).returncode != 0:
        return
    try:
        assert main(["merge", "--aligned", str(fx.aligned), "--unaligned", str(fx.unaligned), "--task-adapter",
                     str(src), "--safety-adapter", str(fx.safety), "--out", str(target.parent), "--force",
                     "--no-progress", "--no-plot"]) == 2
        assert "mounted inside it" in capsys.readouterr().err
    finally:
        subprocess.run(["umount", str(target)], check=True)
    assert sorted(p.name for p in src.iterdir()) == sorted(p.name for p in Path(fx.task).iterdir())


def test_only_a_forced_replacement_checks_what_inputs_link_to(tmp_path):
    """--force replaces --out: refused where an input links into it. A new --out replaces nothing
    (a dangling link to where it will be is no reason to refuse), and a link loop is no target."""
    from safemerge_ext.io.output import check_out

    inp, out = tmp_path / "in", tmp_path / "out"
    inp.mkdir()
    (inp / "loop").symlink_to(inp / "loop")
    (inp / "README.md").symlink_to(out / "README.md")
    assert check_out(out, force=True, inputs=[("--aligned", inp)]) == out
    out.mkdir()
    (out / "README.md").write_text("x")
    with pytest.raises(SafeMergeError, match=rf"--out {out} holds {out / 'README.md'}, which --aligned "
                                             rf"{inp / 'README.md'} links to and the output would replace"):
        check_out(out, force=True, inputs=[("--aligned", inp)])


def test_a_single_file_beside_an_index_of_other_shards_is_refused(fx, tmp_path):
    """transformers loads model.safetensors where both it and an index exist; reading the index's
    shards instead would score (and write) another model than the one a user loads. An index of
    model.safetensors itself is fine."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(fx.aligned, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    save_file(load_model(fx.aligned), str(model / "model.safetensors"))
    with pytest.raises(SafeMergeError, match=rf"--aligned {model} holds both model.safetensors, which transformers "
                                             r"loads, and model.safetensors.index.json, which lists other shards "
                                             r"\(model-00001-of-000\d\d.safetensors, ...\): one of them is stale; remove it"):
        ModelReader(model, "--aligned")
    (model / "model.safetensors.index.json").write_text(json.dumps({**index, "weight_map": {}}))
    with pytest.raises(SafeMergeError, match=r"and model.safetensors.index.json, which lists no tensor: one of them"):
        ModelReader(model, "--aligned")
    index["weight_map"] = {k: "model.safetensors" for k in index["weight_map"]}
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    assert ModelReader(model, "--aligned").shards().keys() == {"model.safetensors"}


def test_a_stale_index_that_a_save_in_place_left_is_named_so(fx, tmp_path):
    """transformers' save_pretrained into a folder that held a sharded save deletes the old shards
    and leaves their index: the folder was refused as "missing a shard; copy the complete model
    folder", though it is complete and transformers loads it (review184). The index is named stale."""
    import shutil

    from transformers import LlamaForCausalLM

    model = tmp_path / "m"
    shutil.copytree(fx.aligned, model)
    LlamaForCausalLM.from_pretrained(model).save_pretrained(model, max_shard_size="100GB")
    assert (model / "model.safetensors").is_file() and (model / "model.safetensors.index.json").is_file()
    with pytest.raises(SafeMergeError) as err:
        ModelReader(model, "--aligned")
    assert re.fullmatch(rf"--aligned {re.escape(str(model))} holds model.safetensors, which transformers loads, and "
                        r"model.safetensors.index.json, which lists shard model-000\d\d-of-000\d\d.safetensors, which is "
                        r"missing: the index is stale \(a save in place leaves it\); remove it", str(err.value)), err.value
    (model / "model.safetensors.index.json").unlink()
    assert ModelReader(model, "--aligned").shards().keys() == {"model.safetensors"}


def test_model_output_refuses_tensors_the_index_does_not_list(fx, tmp_path):
    """The output is laid out from the index; a tensor a shard holds but the index leaves out (which
    transformers still loads) would be dropped, so the writer says so instead."""
    import shutil

    model = tmp_path / "m"
    shutil.copytree(fx.aligned, model)
    index = json.loads((model / "model.safetensors.index.json").read_text())
    shard = index["weight_map"].pop("model.norm.weight")
    (model / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(SafeMergeError, match=rf"{shard} holds 1 tensor\(s\) that model.safetensors.index.json does "
                                             r"not list \(e.g. model.norm.weight\)"):
        write_model(ModelReader(model), tmp_path / "out", lambda n: None)


def test_model_output_refuses_an_update_that_overflows_the_dtype(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    out.mkdir()
    save_file({"w": torch.randn(8, 4).half()}, str(src / "model.safetensors"))
    with pytest.raises(SafeMergeError, match=r"tensor w: the weight plus its update overflows torch.float16"):
        write_model(ModelReader(src), out, lambda n: torch.full((8, 4), 1e6) if n == "w" else None)


def test_model_output_lays_tensors_out_as_the_input_does(tmp_path):
    """Each output shard keeps its input's order of tensors (safetensors writes wider dtypes first, which
    aligns every tensor to its element size): written in model order, fp32 and int64 tensors after an
    odd-sized bool or bf16 one landed at misaligned offsets."""
    def offsets(path):
        with open(path, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(n))
        return {k: v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}

    src, out = tmp_path / "src", tmp_path / "out"
    src.mkdir()
    g = torch.Generator().manual_seed(3)
    tensors = {"model.a_mask": torch.tensor([True, False, True]), "model.b_norm.weight": torch.randn(5, generator=g),
               "model.c_pos": torch.arange(3, dtype=torch.int64), "model.d_proj.weight": torch.randn(3, 5, generator=g)
               .bfloat16(), "model.e_scale": torch.randn(3, generator=g).half()}
    save_file(tensors, src / "model.safetensors", metadata={"format": "pt", "producer": "test"})
    out.mkdir()
    want = offsets(src / "model.safetensors")
    assert sorted(want, key=want.get) != sorted(want, key=natural_key)  # (else the test could not fail)
    write_model(ModelReader(src), out, lambda n: torch.full((3, 5), 0.5) if n == "model.d_proj.weight" else None)
    got = offsets(out / "model.safetensors")
    assert got == want
    sizes = {k: v.element_size() for k, v in tensors.items()}
    assert all(got[k] % sizes[k] == 0 for k in got), got
    merged = load_file(out / "model.safetensors")
    assert torch.equal(merged["model.d_proj.weight"], (tensors["model.d_proj.weight"].float() + 0.5).bfloat16())
    assert all(torch.equal(merged[k], v) for k, v in tensors.items() if k != "model.d_proj.weight")


def _save_checkpoint(tensors: dict, folder, fmt: str) -> None:
    """``tensors`` in ``folder`` as mergekit writes a model: safetensors, or (``--no-safe-serialization``)
    one pytorch_model.bin, or .bin shards with their index."""
    if fmt == "safetensors":
        save_file(tensors, folder / "model.safetensors")
    elif fmt in ("bin", "bin-legacy"):  # (legacy: torch's old non-zip format, which cannot be memory-mapped)
        torch.save(tensors, folder / "pytorch_model.bin", _use_new_zipfile_serialization=fmt == "bin")
    else:
        names = sorted(tensors)
        shards = {"pytorch_model-1.bin": names[::2], "pytorch_model-2.bin": names[1::2]}
        for shard, held in shards.items():
            torch.save({n: tensors[n] for n in held}, folder / shard)
        (folder / "pytorch_model.bin.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": {n: shard for shard, held in shards.items() for n in held}}))


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-shards"])
def test_stored_names_lists_safetensors_and_pytorch_checkpoints(tmp_path, fmt):
    """The tensor names a folder stores, as mergekit finds its files (it reads and writes .bin too): in
    model order, without reading a weight; a folder with neither is one line."""
    from safemerge_ext.io.models import stored_names

    tensors = {f"model.layers.{i}.mlp.down_proj.weight": torch.randn(3, 2) for i in (10, 2, 1)}
    tensors["lm_head.weight"] = torch.randn(4, 2)
    _save_checkpoint(tensors, tmp_path, fmt)
    assert stored_names(tmp_path) == ["model.layers.1.mlp.down_proj.weight", "model.layers.2.mlp.down_proj.weight",
                                      "model.layers.10.mlp.down_proj.weight", "lm_head.weight"]
    if fmt == "bin":  # (a training checkpoint's wrapper, which mergekit unwraps; a value beside the tensors,
        # which is none; torch's old non-zip format, which cannot be memory-mapped: review201)
        for saved, kwargs in (({"state_dict": tensors, "step": 3}, {}), ({**tensors, "step": 1000}, {}),
                              (tensors, {"_use_new_zipfile_serialization": False})):
            torch.save(saved, tmp_path / "pytorch_model.bin", **kwargs)
            assert sorted(stored_names(tmp_path)) == sorted(tensors)
        (tmp_path / "pytorch_model.bin").write_bytes(b"not a checkpoint")
        with pytest.raises(SafeMergeError, match=r"^model .*pytorch_model\.bin: cannot list its tensors \("):
            stored_names(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SafeMergeError, match=r"^the output .*empty: no model\.safetensors, model\.safetensors\.index"
                                             r"\.json, pytorch_model\.bin or pytorch_model\.bin\.index\.json$"):
        stored_names(empty, "the output")


@pytest.mark.parametrize("fmt", ["bin", "bin-legacy", "bin-shards"])
def test_a_pytorch_checkpoint_is_read_as_a_safetensors_one(tmp_path, fmt):
    """mergekit reads pytorch_model.bin folders too: open_model gives a reader of the same names,
    shapes, dtypes and module lookup as ModelReader's for the same tensors in safetensors, so that
    the checks of mergekit's inputs hold for both (they were skipped for .bin: review201)."""
    from safemerge_ext.io.models import BinModelReader, open_model

    torch.manual_seed(0)
    tensors = {"model.embed_tokens.weight": torch.randn(8, 4, dtype=torch.bfloat16),
               "model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4),
               "model.layers.0.self_attn.q_proj.bias": torch.randn(4, dtype=torch.float16),
               "model.layers.10.mlp.down_proj.weight": torch.randn(4, 6),
               "lm_head.weight": torch.randn(8, 4)}
    st = tmp_path / "st"
    st.mkdir()
    _save_checkpoint(tensors, st, "safetensors")
    pt = tmp_path / "pt"
    pt.mkdir()
    _save_checkpoint(tensors, pt, fmt)
    with open_model(st) as want, open_model(pt, "role task: model") as got:
        assert isinstance(got, BinModelReader) and not isinstance(want, BinModelReader)
        assert got.names == want.names and got.is_sharded == (fmt == "bin-shards")
        for name in tensors:
            assert name in got and got.meta(name) == want.meta(name)
            assert torch.equal(got.get(name), tensors[name]) and got.get(name).dtype == tensors[name].dtype
        for module in ("model.layers.0.self_attn.q_proj", "base.model.layers.10.mlp.down_proj", "lm_head", "q_proj"):
            assert got.resolve_module(module) == want.resolve_module(module), module
        with pytest.raises(SafeMergeError, match=r"^role task: model .*: tensor model\.norm\.weight is missing"):
            got.meta("model.norm.weight")
        # what reads a safetensors file's bytes refuses, rather than give the .bin file's bytes as a tensor's
        name = "model.layers.0.self_attn.q_proj.weight"
        for read in (lambda: got.get_rows(name, 0, 1), lambda: got.map(name), lambda: got.first_nonfinite([name])):
            with pytest.raises(SafeMergeError, match=r"\.bin: a PyTorch \.bin file is read a whole tensor at a time"):
                read()


@pytest.mark.parametrize("fmt", ["safetensors", "bin", "bin-shards"])
@pytest.mark.parametrize("where", ["top", "text_config"])
def test_a_stored_head_is_untied_in_the_config_of_a_model_another_tool_wrote(tmp_path, where, fmt):
    """mergekit copies the base model's config: where the output stores a head the config ties to
    the embeddings (a task model PEFT untied), the config is untied; otherwise it is left as it was.
    So too where mergekit wrote .bin files (--no-safe-serialization: the head stayed tied; review199)."""
    from safemerge_ext.io.model_writer import untie_stored_head

    def model(name, tensors, tie=True):
        d = tmp_path / f"{name}-{where}"
        d.mkdir()
        _save_checkpoint(tensors, d, fmt)
        cfg = {"model_type": "llama", "tie_word_embeddings": tie} if where == "top" else \
            {"model_type": "gemma3", "text_config": {"tie_word_embeddings": tie}}
        (d / "config.json").write_text(json.dumps(cfg))
        return d

    emb = {"model.embed_tokens.weight": torch.randn(8, 4)}
    head = model("head", {**emb, "lm_head.weight": torch.randn(8, 4)})
    note = untie_stored_head(head)
    cfg = json.loads((head / "config.json").read_text())
    assert (cfg if where == "top" else cfg["text_config"])["tie_word_embeddings"] is False
    assert "lm_head.weight is written as its own tensor" in note
    for d in (model("tied", emb), model("untied", {**emb, "lm_head.weight": torch.randn(8, 4)}, tie=False)):
        before = (d / "config.json").read_bytes()
        assert untie_stored_head(d) is None and (d / "config.json").read_bytes() == before


@pytest.mark.parametrize("model_type, tied", [("gemma3_text", True), ("gemma2", True), ("llama", False),
                                              ("no-such-model", True)])
def test_a_config_without_tie_word_embeddings_ties_as_its_class_does(tmp_path, model_type, tied):
    """transformers saves only what differs from the config class's defaults: a Gemma config.json has no
    tie_word_embeddings and ties (its class's default), a Llama one without the key does not; a model_type
    transformers does not know ties, as PretrainedConfig does. A stored head is untied where it is tied."""
    from safemerge_ext.io.model_writer import untie_stored_head
    from safemerge_ext.io.models import is_tied_head, ties_embeddings

    d = tmp_path / model_type
    d.mkdir()
    save_file({"model.embed_tokens.weight": torch.randn(8, 4), "lm_head.weight": torch.randn(8, 4)},
              d / "model.safetensors")
    (d / "config.json").write_text(json.dumps({"model_type": model_type, "vocab_size": 8}))
    assert ties_embeddings(d) is tied and is_tied_head("lm_head", d) is tied and not is_tied_head("q_proj", d)
    note = untie_stored_head(d)
    cfg = json.loads((d / "config.json").read_text())
    assert (note is not None) is tied and cfg.get("tie_word_embeddings") is (False if tied else None), cfg
    assert ties_embeddings(d) is False
    assert ties_embeddings(tmp_path / "nothing-here") is False


def test_side_files_leave_out_indexes_of_weights_not_copied_and_earlier_reports(tmp_path):
    """An earlier run's report in the input (a merged model merged again) describes another merge."""
    from safemerge_ext.io.model_writer import copy_side_files
    from safemerge_ext.report import REPORT_JSON, REPORT_PNG

    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir()
    dst.mkdir()
    for name in ("config.json", "tokenizer.json", "pytorch_model.bin.index.json", "pytorch_model.bin",
                 "model.safetensors.index.json", REPORT_JSON, REPORT_PNG,
                 # other formats' weights (GPT-2's repository ships these): they would load unmerged
                 "tf_model.h5", "flax_model.msgpack", "rust_model.ot", "64.tflite", "model.onnx", "model.onnx_data"):
        (src / name).write_text("{}")
    # an earlier merge's recipe, card and report sidecar (review147); a model's own card is kept
    for name in ("mergekit_config.yml", ".safemerge_layers.4242-1-host.jsonl"):
        (src / name).write_text("x")
    (src / "README.md").write_text("---\nbase_model: []\nlibrary_name: transformers\ntags:\n- mergekit\n- merge\n\n"
                                   "---\n# merged\n\nThis is a merge of pre-trained language models created using mergekit.\n")
    (src / "config.json").chmod(0o444)  # (a read-only model store: the output's copy is the user's to edit)
    assert copy_side_files(src, dst) == ["config.json", "tokenizer.json"]
    (src / "README.md").write_text("---\nlicense: llama2\ntags:\n- facebook\n- llama\n---\n# Llama 2 (it mentions mergekit)\n")
    assert copy_side_files(src, tmp_path) == ["README.md", "config.json", "tokenizer.json"]
    mask = os.umask(0)
    os.umask(mask)
    assert (dst / "config.json").stat().st_mode & 0o777 == 0o666 & ~mask


def test_an_interrupt_after_the_output_is_in_place_ends_the_run_with_the_output_complete(tmp_path, monkeypatch,
                                                                                        capsys):
    """With --force, the new output is renamed into place, then the old one is deleted: an
    interrupt during that delete leaves the new output and a warning that names what is left of
    the old one, and the run ends as interrupted (committed() tells the command --out is complete)."""
    from safemerge_ext.io import output

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    real = output.shutil.rmtree

    def interrupted(path, *a, **k):
        if ".old-" in str(path):
            raise KeyboardInterrupt
        return real(path, *a, **k)

    monkeypatch.setattr(output.shutil, "rmtree", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with output.staged_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt"] and output.committed(out)
    err = capsys.readouterr().err
    left = [p for p in tmp_path.iterdir() if ".old-" in p.name]
    assert len(left) == 1 and f"delete {left[0]} by hand" in err and "was written" in err, err


def test_an_interrupt_while_the_staging_folder_is_made_leaves_nothing(tmp_path, monkeypatch):
    """The folders a run makes for its output (missing parents, the staging folder) are taken back
    from the first one on, however early an interrupt comes."""
    from safemerge_ext.io import output

    def interrupted(final, kind):
        assert (tmp_path / "deep" / "er").is_dir()  # (the parents are made by then)
        raise KeyboardInterrupt

    monkeypatch.setattr(output, "_sibling", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with output.staged_dir(tmp_path / "deep" / "er" / "out", force=False):
            pass
    assert list(tmp_path.iterdir()) == []


def test_a_second_interrupt_does_not_cut_the_clean_up_short(tmp_path, monkeypatch):
    """Ctrl-C twice: the first ends the run, the second arrives while the staging folder of partial
    shards is deleted; that deletion still finishes (nothing hidden is left beside --out)."""
    import shutil
    import signal

    from safemerge_ext.io import output

    real = shutil.rmtree

    def rmtree(path, *a, **k):  # (the second Ctrl-C, at the start of the clean-up)
        os.kill(os.getpid(), signal.SIGINT)
        return real(path, *a, **k)

    monkeypatch.setattr(output.shutil, "rmtree", rmtree)
    with pytest.raises(KeyboardInterrupt):
        with output.staged_dir(tmp_path / "deep" / "out", force=False) as tmp:
            for i in range(5):
                (tmp / f"shard-{i}.safetensors").write_bytes(b"x" * 4096)
            os.kill(os.getpid(), signal.SIGINT)  # (the first Ctrl-C, mid-write)
            pytest.fail("the first interrupt was not raised")
    assert list(tmp_path.iterdir()) == []
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    # a run failing otherwise (a full disk): the clean-up finishes, then the Ctrl-C is raised
    with pytest.raises(KeyboardInterrupt):
        with output.staged_dir(tmp_path / "out", force=False) as tmp:
            (tmp / "shard.safetensors").write_bytes(b"x" * 4096)
            raise OSError(28, "No space left on device")
    assert list(tmp_path.iterdir()) == []


def test_streaming_writer_refuses_a_wrong_shape_and_an_incomplete_file(tmp_path):
    from safemerge_ext.io.safetensors_stream import StreamingWriter

    with pytest.raises(ValueError, match=r"expected w \(2, 3\) F32 next, got w \(3, 2\) F32"):
        with StreamingWriter(tmp_path / "s.safetensors", [("w", (2, 3), torch.float32)]) as sw:
            sw.write("w", torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"only 1 of 2 tensors were written"):
        with StreamingWriter(tmp_path / "t.safetensors", [("a", (2,), torch.float32), ("b", (2,), torch.float32)]) as sw:
            sw.write("a", torch.zeros(2))


def test_nan_in_a_tensor_larger_than_the_lookahead_is_refused(fx, tmp_path, monkeypatch):
    from safemerge_ext.io import model_writer

    a = tmp_path / "a"
    shutil.copytree(fx.aligned, a)
    name = "model.norm.weight"
    shard = a / json.loads((a / "model.safetensors.index.json").read_text())["weight_map"][name]
    sd = load_file(shard)
    sd[name][3] = float("nan")
    save_file(sd, shard, metadata={"format": "pt"})
    monkeypatch.setattr(model_writer, "LOOKAHEAD_BYTES", 1)  # every tensor is larger (a 70B model's 2 GB embedding vs 1 GiB)
    (tmp_path / "out").mkdir()
    with pytest.raises(SafeMergeError, match=f"tensor {name} contains NaN or Inf"):
        write_model(ModelReader(a), tmp_path / "out", lambda n: None)


def test_write_model_returns_the_bytes_it_wrote(fx, tmp_path):
    r = ModelReader(fx.aligned)
    (tmp_path / "o").mkdir()
    got = write_model(r, tmp_path / "o", lambda n: None)
    assert got == sum(r.layout(n)[2] for n in r.names) > 0


def test_check_fits_names_a_module_whose_shape_is_not_the_weights(fx, tmp_path):
    from safemerge_ext.io.adapters import check_fits, read_adapter

    q0 = "model.layers.0.self_attn.q_proj"
    t = tmp_path / "t"
    shutil.copytree(fx.task, t)
    sd = load_file(t / "adapter_model.safetensors")
    key = f"base_model.model.{q0}.lora_B.weight"
    sd[key] = sd[key][:32].clone()
    save_file(sd, t / "adapter_model.safetensors")
    with pytest.raises(SafeMergeError) as err:
        check_fits(read_adapter(t, "x", folded=True), ModelReader(fx.aligned), "role task")
    assert str(err.value) == (f"role task: LoRA adapter {t} module {q0} is 32x64 but the weight {q0}.weight is 64x64; "
                              "the adapter belongs to another model")


def test_a_module_name_two_weights_end_with_resolves_to_none(tmp_path):
    save_file({"text.layers.0.q.weight": torch.zeros(2, 2), "vision.layers.0.q.weight": torch.ones(2, 2),
               "text.layers.1.q.weight": torch.zeros(2, 2)}, tmp_path / "model.safetensors")
    r = ModelReader(tmp_path)
    assert r.resolve_module("layers.1.q") == "text.layers.1.q.weight"  # (one weight ends so: that one)
    assert r.resolve_module("layers.0.q") is None  # (two do: neither, rather than the wrong tower)


_NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj", "model.layers.12.mlp.down_proj",
          "model.layers.1.block_sparse_moe.experts.0.w1", "transformer.h.3.attn.c_attn", "lm_head",
          "model.language_model.layers.2.self_attn.q_proj", "language_model.model.layers.2.self_attn.o_proj",
          "layers.0.self_attn.k_proj", "model.proj.0"]  # (no layer index for PEFT: the first part; the last)


@pytest.mark.parametrize("config", [
    {"target_modules": ["q_proj", "v_proj", "down_proj", "w1", "c_attn", "lm_head", "o_proj"]},
    {"target_modules": ["q_proj"]},
    {"target_modules": ["q_proj", "v_proj", "down_proj", "w1", "o_proj"], "layers_to_transform": [0, 2]},
    {"target_modules": ["q_proj", "v_proj", "w1"], "layers_to_transform": 1},
    {"target_modules": ["q_proj", "v_proj", "c_attn"], "layers_to_transform": [3], "layers_pattern": "h"},
    {"target_modules": ["q_proj", "c_attn", "o_proj"], "layers_to_transform": [2, 3], "layers_pattern": ["h", "layers"]},
    {"target_modules": ["q_proj", "v_proj"], "layers_to_transform": []},
    {"target_modules": ["q_proj", "k_proj", "proj.0"], "layers_to_transform": [0]},
    # (a module listed by its full name: PEFT loads it whatever layers_to_transform says)
    {"target_modules": ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.v_proj"], "layers_to_transform": [1]},
    {"target_modules": ["q_proj", "v_proj", "down_proj"], "exclude_modules": ["model.layers.1.self_attn.v_proj"]},
    {"target_modules": r".*_proj", "exclude_modules": r".*layers\.(0|2)\..*"},
])
def test_untargeted_follows_peft(config):
    """The modules an adapter's config leaves out are those PEFT's own check does not target (peft's
    check_target_module_exists, per name as written and as transformers names it in memory)."""
    from types import SimpleNamespace

    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    from safemerge_ext.io.adapters import untargeted
    from safemerge_ext.io.models import canonical_name

    peft_cfg = LoraConfig(**config)
    found = {m: check_target_module_exists(peft_cfg, m) for n in _NAMES for m in (n, canonical_name(n))}
    loads = {n: any(bool(found[m]) for m in (n, canonical_name(n))) for n in _NAMES}  # (an exclusion is falsy)
    missed, keys = untargeted(SimpleNamespace(config=config, modules=dict.fromkeys(_NAMES)))
    assert sorted(missed) == sorted(n for n in _NAMES if not loads[n])
    assert set(keys) <= set(config) and bool(keys) == bool(missed)


def test_json_inputs_are_read_as_utf8_in_any_locale(fx, tmp_path):
    """JSON is UTF-8 (RFC 8259) whatever the locale: configs, an index and an adapter config a tool
    wrote with ensure_ascii=False (a path with 'é' and '中') were read in the locale's encoding,
    "not valid JSON ('ascii' codec ...)" under LC_ALL=C PYTHONUTF8=0, and misread under Latin-1
    (review135). A whole `merge --output model` in an ASCII locale reads them all."""
    import subprocess

    where = "/home/jos\u00e9/llama-\u4e2d"
    copies = {name: shutil.copytree(getattr(fx, name), tmp_path / name) for name in ("aligned", "task")}
    for path, key in ((copies["task"] / "adapter_config.json", "base_model_name_or_path"),
                      (copies["aligned"] / "config.json", "_name_or_path"),
                      (copies["aligned"] / "model.safetensors.index.json", "source")):
        data = json.loads(path.read_text(encoding="utf-8"))
        data[key] = where
        path.write_text(json.dumps(data, ensure_ascii=False), encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LC_", "PYTHONIOENCODING"))}
    env.update(LANG="C", LC_ALL="C", PYTHONUTF8="0", PYTHONCOERCECLOCALE="0")
    done = subprocess.run([sys.executable, "-c", "import locale; print(locale.getpreferredencoding(False))"],
                          capture_output=True, text=True, env=env)
    if done.stdout.strip().lower().replace("-", "") in ("utf8",):
        pytest.skip("this Python reads text as UTF-8 in the C locale whatever PYTHONUTF8 says")
    done = subprocess.run([sys.executable, "-m", "safemerge_ext", "merge", "--aligned", str(copies["aligned"]),
                           "--unaligned", str(fx.unaligned), "--task-adapter", str(copies["task"]),
                           "--safety-adapter", str(fx.safety), "--out", str(tmp_path / "out"), "--output", "model",
                           "--threshold", "0.2", "--no-plot", "--no-progress"], capture_output=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr.decode("utf-8", "replace")[-2000:]
    assert json.loads((tmp_path / "out" / "config.json").read_bytes())["_name_or_path"] == where


def test_a_force_run_whose_output_another_run_moved_aside_first_goes_on(tmp_path, monkeypatch):
    """Two --force runs onto one output: when the other moved it aside between this run's look and
    its own move, this run said "--force could not move the existing output aside (No such file or
    directory); remove it yourself" (review139). There is nothing left to move: it goes on."""
    from safemerge_ext.io import output

    final = tmp_path / "out"
    final.mkdir()
    (final / "f").write_text("old")
    real = Path.rename

    def the_other_run_first(self, target):
        if self == final and ".out.old-" in str(target):  # (the other run's move of it, just before ours)
            real(self, tmp_path / ".out.old-0a1b2c3d")
            raise FileNotFoundError(2, "No such file or directory", str(self))
        return real(self, target)

    monkeypatch.setattr(Path, "rename", the_other_run_first)
    with output.staged_dir(final, force=True) as tmp:
        (tmp / "f").write_text("new")
    assert (final / "f").read_text() == "new"
    assert (tmp_path / ".out.old-0a1b2c3d" / "f").read_text() == "old"  # (the other run's to delete)


def test_rank_and_alpha_patterns_compile_once_per_key():
    """An adapter written by merge or project has a rank/alpha pattern key per module (560 for a 70B
    all-linear one): past re's cache of 512 each match recompiled its pattern, 3 s to read such an
    adapter, 28 s at 405B (review149). Each key compiles once, and the first match still wins."""
    from safemerge_ext.io.adapters import _pattern, pattern_key

    modules = [f"model.layers.{i}.{m}" for i in range(126) for m in ("self_attn.q_proj", "self_attn.k_proj",
                                                                      "self_attn.v_proj", "mlp.down_proj", "mlp.up_proj")]
    keys = list(reversed(modules))
    before = _pattern.cache_info().misses
    assert [pattern_key(keys, m) for m in modules] == modules
    assert _pattern.cache_info().misses - before <= len(keys)
    assert pattern_key(["q_proj", "model.layers.0.self_attn.q_proj"], "model.layers.0.self_attn.q_proj") == "q_proj"
    assert pattern_key(["layers.1.self_attn.q_proj"], "model.layers.11.self_attn.q_proj") is None

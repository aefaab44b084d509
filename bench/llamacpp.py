"""Benchmark: llama.cpp (llama-bench) beside moemesh, one process, on the same models and CPU.

llama.cpp is built once from the source vendored in the ``llama-cpp-python`` 0.3.36 sdist
(PyPI) into a cache folder, the bench model (random weights) and the demo model are
converted with its own ``convert_hf_to_gguf.py`` (the bench model is built here with the
demo model's vocabulary size and borrows its tokenizer, since the converter needs a tokenizer
it knows; both sides run that same model) and quantized with ``llama-quantize`` to Q8_0 and Q4_0. Then, in one
run, llama-bench's decode and prefill tok/s at bf16, Q8_0 and Q4_0 are printed beside
moemesh's one-process figures at bf16 (--quantize none and bf16), int8 and int4 (the span called in process, each
precision in a process of its own, as bench/quant.py does), with the ratios: rounds of
llama-bench and of moemesh interleave, and each ratio is the median of the rounds' ratios.

Needs cmake, make and a C++ compiler (Debian/Ubuntu: ``apt-get install cmake g++``). The
build takes a while on a small machine; it is done once (``--cache``).

    python bench/llamacpp.py                  # build if needed, convert, bench both models
    python bench/llamacpp.py --build-only     # just build llama.cpp into the cache
    python bench/llamacpp.py --threads 2 --tokens 32
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

SDIST = "llama-cpp-python==0.3.36"
SDIST_FILE = "llama_cpp_python-0.3.36.tar.gz"
# gguf, --quantize, label: BF16 beside both unquantized kinds of span ("bf16 tf": transformers'
# kernels and bits, --quantize none; "bf16": the same weights on moemesh's kernels)
PAIRS = (
    ("bf16", "none", "bf16 tf"), ("bf16", "bf16", "bf16"), ("q8_0", "int8", "int8"), ("q4_0", "int4", "int4"),
)  # fmt: skip
TOOLS = ("llama-bench", "llama-quantize")


def _run(cmd: list[str], **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, check=True, text=True, **kw)  # type: ignore[call-overload, no-any-return]


def source(cache: Path) -> Path:
    """The vendored llama.cpp source tree of the sdist, downloaded and unpacked once."""
    tree = cache / "llama_cpp_python-0.3.36" / "vendor" / "llama.cpp"
    if (tree / "CMakeLists.txt").is_file():
        return tree
    archive = cache / SDIST_FILE
    if not archive.is_file():
        _run([sys.executable, "-m", "pip", "download", SDIST, "--no-deps", "--no-binary", ":all:", "-d", str(cache)])
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if "/vendor/llama.cpp/" in m.name or m.name.endswith("vendor")]
        tar.extractall(cache, members=members, filter="data")
    return tree


# ggml's CPU flags for what /proc/cpuinfo lists (a build for this CPU without AMX, see `_arch`)
GGML_ISA = (
    ("sse4_2", "SSE42"), ("f16c", "F16C"), ("fma", "FMA"), ("bmi2", "BMI2"), ("avx", "AVX"), ("avx2", "AVX2"),
    ("avx_vnni", "AVX_VNNI"), ("avx512f", "AVX512"), ("avx512vbmi", "AVX512_VBMI"), ("avx512_vnni", "AVX512_VNNI"),
    ("avx512_bf16", "AVX512_BF16"),
)  # fmt: skip


def _arch() -> tuple[str, list[str]]:
    """(build folder name, cmake flags) for this CPU. Native, except on CPUs with AMX: there
    this llama.cpp's AMX backend crashed (SIGSEGV in ggml_backend_amx_mul_mat, llama-bench on a
    Q8_0 model, a Xeon VM), so it is built for every other ISA extension the CPU lists."""
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split())
    except OSError:
        flags = set()
    if "amx_int8" not in flags:
        return "build", ["-DGGML_NATIVE=ON"]
    isa = [f"-DGGML_{name}={'ON' if flag in flags else 'OFF'}" for flag, name in GGML_ISA]
    return "build-no-amx", ["-DGGML_NATIVE=OFF", *isa]


def build(cache: Path, jobs: int) -> Path:
    """llama-bench and llama-quantize built (Release, for this CPU: `_arch`), once; returns the bin folder."""
    tree = source(cache)
    folder, arch = _arch()
    out = cache / folder
    bin_dir = out / "bin"
    if all((bin_dir / t).is_file() for t in TOOLS):
        return bin_dir
    missing = [t for t in ("cmake", "make", "c++") if shutil.which(t) is None]
    if missing:
        raise SystemExit(
            f"llama.cpp needs {', '.join(missing)}: install them (Debian/Ubuntu: apt-get install cmake g++)"
        )
    _run(
        [
            "cmake", "-S", str(tree), "-B", str(out), "-DCMAKE_BUILD_TYPE=Release", *arch,
            "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
            "-DGGML_OPENMP=ON",
        ]
    )  # fmt: skip
    started = time.perf_counter()
    _run(["cmake", "--build", str(out), "--config", "Release", "-j", str(jobs), "--target", *TOOLS])
    print(f"built llama.cpp in {time.perf_counter() - started:.0f} s", flush=True)
    return bin_dir


def _with_tokenizer(model: Path, tokenizer_from: Path, work: Path) -> Path:
    """`model`'s folder as the converter needs it: an `architectures` entry in its config, and the
    tokenizer files of `tokenizer_from` when it has none of its own."""
    import json as _json

    has_tokenizer = (model / "tokenizer.json").is_file() or (model / "tokenizer.model").is_file()
    if has_tokenizer and _json.loads((model / "config.json").read_text()).get("architectures"):
        return model

    folder = work / f"{model.name}-with-tokenizer"
    folder.mkdir(parents=True, exist_ok=True)
    for f in model.iterdir():
        target = folder / f.name
        if not target.exists() and f.name != "config.json":
            target.symlink_to(f.resolve())
    config = _json.loads((model / "config.json").read_text())
    if not config.get("architectures"):  # the converter picks its class by this name
        config["architectures"] = [{"mixtral": "MixtralForCausalLM"}.get(config["model_type"], "")]
    (folder / "config.json").write_text(_json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if not has_tokenizer and (tokenizer_from / name).is_file():
            shutil.copy(tokenizer_from / name, folder / name)
    return folder


def convert(tree: Path, bin_dir: Path, model: Path, tokenizer_from: Path, out: Path) -> dict[str, Path]:
    """bf16, Q8_0 and Q4_0 GGUF files of `model` (converted and quantized once)."""
    out.mkdir(parents=True, exist_ok=True)
    files = {q: out / f"{model.name}-{q}.gguf" for q, _, _ in PAIRS}
    if not files["bf16"].is_file():
        folder = _with_tokenizer(model, tokenizer_from, out)
        env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py"), "NO_LOCAL_GGUF": ""}
        convert_py = str(tree / "convert_hf_to_gguf.py")
        _run([sys.executable, convert_py, str(folder), "--outtype", "bf16", "--outfile", str(files["bf16"])], env=env)
    for q in ("q8_0", "q4_0"):
        if not files[q].is_file():
            _run([str(bin_dir / "llama-quantize"), str(files["bf16"]), str(files[q]), q.upper(), "2"])
    return files


def llama_bench(bin_dir: Path, gguf: Path, threads: int, prompt: int, tokens: int, repeat: int) -> dict[str, float]:
    """llama-bench's prefill (pp) and decode-after-`prompt` (tg with depth) tok/s."""
    cmd = [
        str(bin_dir / "llama-bench"), "-m", str(gguf), "-t", str(threads), "-r", str(repeat), "-o", "json",
        "-p", str(prompt), "-n", str(tokens), "-d", f"0,{prompt}",
    ]  # fmt: skip
    rows = json.loads(_run(cmd, capture_output=True).stdout)
    got: dict[str, float] = {}
    for row in rows:
        if row.get("n_prompt", 0) > 0 and row.get("n_depth", 0) == 0:
            got["prefill_tok_s"] = float(row["avg_ts"])
        if row.get("n_gen", 0) > 0 and row.get("n_depth", 0) == prompt:
            got["decode_tok_s"] = float(row["avg_ts"])
    return got


def interleaved(
    bin_dir: Path, files: dict[str, Path], model: Path, threads: int, prompt: int, tokens: int, repeat: int
) -> list[tuple[dict[str, dict[str, float]], dict[str, dict[str, float]]]]:
    """`repeat` rounds, each llama-bench once per GGUF file, then moemesh's one-process decode
    tok/s after `prompt` and prefill tok/s per --quantize: (llama.cpp's, moemesh's) per round.
    Interleaved, so that a ratio compares two runs minutes apart at most on this shared
    machine. Each moemesh precision runs in a process of its own (bench/quant.py's workers:
    torch's int8 kernel slows oneDNN's bf16 matmuls in the process it ran in), loaded once."""
    import torch
    from quant import span_workers

    from shards import Checkpoint

    cfg = Checkpoint(model).config
    ids = torch.randint(1, cfg.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(1))
    rounds = []
    with span_workers(model, list(dict.fromkeys(m for _, m, _ in PAIRS)), ids, threads) as workers:
        for r in range(repeat):
            theirs = {q: llama_bench(bin_dir, f, threads, prompt, tokens, 1) for q, f in files.items()}
            ours = {}
            for m, (conn, _, _) in workers.items():
                conn.send(tokens)
                prefill_s, decode_tok_s = conn.recv()
                ours[m] = {"prefill_tok_s": prompt / prefill_s, "decode_tok_s": decode_tok_s}
            print(
                f"round {r + 1}/{repeat}: decode "
                + ", ".join(f"{q} {v.get('decode_tok_s', 0):.1f}" for q, v in theirs.items())
                + " | "
                + ", ".join(f"{m} {v['decode_tok_s']:.1f}" for m, v in ours.items())
                + " tok/s",
                flush=True,
            )
            rounds.append((theirs, ours))
    return rounds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-llamacpp")
    parser.add_argument("--bench-cache", type=Path, default=Path(tempfile.gettempdir()) / "moemesh-bench")
    parser.add_argument("--demo", type=Path, help="the demo model folder (default: build or reuse the cached one)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 2, help="build jobs")
    parser.add_argument("--threads", type=int, default=2, help="compute threads for both (default 2)")
    parser.add_argument("--tokens", type=int, default=32, help="decode tokens (default 32)")
    parser.add_argument("--repeat", type=int, default=3, help="interleaved rounds of both (default 3)")
    parser.add_argument("--build-only", action="store_true")
    args = parser.parse_args()

    args.cache.mkdir(parents=True, exist_ok=True)
    bin_dir = build(args.cache, args.jobs)
    if args.build_only:
        print(f"llama.cpp tools in {bin_dir}")
        return 0
    import torch
    from pipeline import BENCH
    from pipeline import build as build_bench

    from node.demo_model import build_demo_model

    demo = args.demo or build_demo_model()
    # the bench model's shape with the demo model's vocabulary: the converter knows that tokenizer
    vocab = json.loads((demo / "config.json").read_text())["vocab_size"]
    bench = build_bench(
        args.bench_cache / f"bench-vocab{vocab}-bfloat16", BENCH | {"vocab_size": vocab}, torch.bfloat16
    )
    tree = source(args.cache)
    summary: dict[str, object] = {}
    med = statistics.median
    for name, model, prompt in (("bench model", bench, 128), ("demo model", demo, 16)):
        files = convert(tree, bin_dir, model, demo, args.cache / "gguf")
        rounds = interleaved(bin_dir, files, model, args.threads, prompt, args.tokens, args.repeat)
        print(
            f"\n{name} ({model.name}): decode after {prompt} tokens and {prompt}-token prefill, {args.threads} threads,"
            f" {args.repeat} interleaved rounds (medians; the ratio is the median of each round's)"
        )
        print(f"{'llama.cpp':10} {'tok/s':>8} {'moemesh':>8} {'tok/s':>8} {'ratio':>6}   kind")
        rows = []
        for q, mode, label in PAIRS:
            for kind in ("decode_tok_s", "prefill_tok_s"):
                a = med(theirs[q].get(kind, float("nan")) for theirs, _ in rounds)
                b = med(ours[mode][kind] for _, ours in rounds)
                ratio = med(ours[mode][kind] / theirs[q].get(kind, float("nan")) for theirs, ours in rounds)
                rows.append({"model": name, "llamacpp": q, "moemesh": label, "kind": kind, "llamacpp_tok_s": a,
                             "moemesh_tok_s": b, "ratio": ratio})  # fmt: skip
                print(f"{q.upper():10} {a:8.1f} {label:>8} {b:8.1f} {ratio:6.2f}x  {kind.removesuffix('_tok_s')}")
        summary[name] = rows
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())

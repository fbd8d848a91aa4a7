"""faiss-gpu wiring (retrieval.jobs.gpu): on the CPU machines the choices and the fallbacks, with FAISS's
GPU cloner stood in by a CPU flat index; the real GPU comparison runs where faiss-gpu sees a GPU."""

from __future__ import annotations

import numpy as np
import pytest

from retrieval.jobs.gpu import gpu_count, gpu_training, to_gpu, use_gpu
from retrieval.jobs.index import BuildConfig, IndexError_
from tests.conftest import clustered


def test_device_choices_fail_clearly_without_a_gpu():
    if gpu_count():
        pytest.skip("this machine has a GPU")
    assert use_gpu("auto") is False and use_gpu("cpu") is False
    with pytest.raises(IndexError_, match=r"pip install -e '.\[gpu\]'"):
        use_gpu("cuda")
    with pytest.raises(IndexError_, match="one of auto, cpu, cuda"):
        BuildConfig(device="tpu")


def test_ivf_training_uses_the_clustering_index_and_lets_it_go(monkeypatch):
    import faiss

    x = clustered(4000, 32, 16).astype(np.float32)
    made = []

    def cloner(index, *args):  # stands in for the GPU copy: the same flat L2 index, on the CPU
        made.append(index)
        return index

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", cloner)
    # FAISS's exact distances (not BLAS's |x|^2 + |c|^2 - 2xc, which an opened or built index turns on for
    # this process: search_in_batches), so both k-means runs assign by the same arithmetic
    monkeypatch.setattr(faiss.cvar, "distance_compute_blas_threshold", 1 << 30)
    ref, ours = (faiss.index_factory(32, "PCA16,IVF64,Flat", faiss.METRIC_INNER_PRODUCT) for _ in range(2))
    for index, on in ((ref, False), (ours, True)):
        with gpu_training(index, on):
            assert (faiss.extract_index_ivf(index).clustering_index is not None) is on
            faiss.ParameterSpace().set_index_parameter(index, "verbose", 0)
            index.train(x)
        assert faiss.extract_index_ivf(index).clustering_index is None
    assert len(made) == 1 and isinstance(made[0], faiss.IndexFlatL2)
    cents = [faiss.extract_index_ivf(i).quantizer.reconstruct_n(0, 64) for i in (ref, ours)]
    np.testing.assert_allclose(cents[0], cents[1], atol=1e-5)  # the same k-means, assigned elsewhere


def test_a_type_without_a_gpu_version_stays_on_the_cpu(monkeypatch):
    import faiss

    def refuse(index, *args):
        raise RuntimeError("This index type is not implemented on GPU.")

    monkeypatch.setattr(faiss, "index_cpu_to_all_gpus", refuse)
    monkeypatch.setattr(faiss, "GpuMultipleClonerOptions", lambda: type("Options", (), {})(), raising=False)
    index = faiss.IndexHNSWFlat(8, 4)
    assert to_gpu(index, True) is index and to_gpu(index, False) is index


@pytest.mark.skipif(gpu_count() == 0, reason="needs faiss-gpu and a GPU (pip install -e '.[gpu]' on a CUDA machine)")
def test_gpu_search_answers_as_the_cpu_index():
    import faiss

    x = clustered(20000, 64, 32).astype(np.float32)
    index = faiss.index_factory(64, "IVF256,Flat", faiss.METRIC_INNER_PRODUCT)
    with gpu_training(index, True):
        index.train(x)
    index.add(x)
    index.nprobe = 256
    _, cpu = index.search(x[:200], 10)
    _, gpu = to_gpu(index, True).search(x[:200], 10)
    assert np.mean([len(set(a) & set(b)) / 10 for a, b in zip(cpu, gpu)]) > 0.99

"""A client process for tests/test_label_density.py: fits a semi-supervised mixture on a
stack generated on the workers (3 classes, 3 attributes, 16 chunks), with every pixel
labelled or 100 of them, on the running cluster at ``argv[1]``; prints its own peak
resident memory, the fit's seconds and every warning raised, as JSON.

Usage: python label_density_client.py ADDRESS {every,few} N_PIXELS
"""

import json
import resource
import sys
import time
import warnings

import dask.array as da
import numpy as np
from distributed import Client


def block(block_info=None, D=3):
    loc = block_info[None]["array-location"][0]
    n = loc[1] - loc[0]
    rng = np.random.default_rng(loc[0])
    z = rng.integers(0, 3, n)
    means = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 2.0], [0.0, 4.0, -2.0]])
    return (means[z] + rng.normal(size=(n, D))).astype(np.float32)


def labels_of(x, every):
    lab = np.argmin(((x[:, None, :2] - np.array([[0, 0], [4, 0], [0, 4]])) ** 2).sum(-1), axis=1)
    return lab if every else np.full(len(x), -1)


def main():
    address, mode, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    from daskem import GaussianMixtureClassifier

    chunk = n // 16
    with warnings.catch_warnings(record=True) as caught, Client(address):
        warnings.simplefilter("always")
        X = da.map_blocks(block, chunks=((chunk,) * 16, (3,)), dtype=np.float32)
        y = X.map_blocks(labels_of, mode == "every", drop_axis=1, dtype=np.int64)
        if mode == "few":  # 100 labelled pixels, spread over the chunks
            idx = da.arange(n, chunks=chunk)
            lab_all = X.map_blocks(labels_of, True, drop_axis=1, dtype=np.int64)
            y = da.where(idx % (n // 100) == 0, lab_all, -1)
        t = time.perf_counter()
        gm = GaussianMixtureClassifier(max_iter=4, tol=0.0, random_state=0)
        gm.fit(X, y)
        seconds = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(
        json.dumps(
            {
                "peak_mib": peak,
                "seconds": seconds,
                "warnings": [str(w.message) for w in caught],
                "means": gm.means_.tolist(),
            }
        )
    )


if __name__ == "__main__":
    main()

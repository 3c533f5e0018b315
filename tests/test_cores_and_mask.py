"""What the README says about cores and the tissue mask holds: worker counts follow the cores this
process may use (its CPU affinity, as Slurm and cgroups set it, not the machine's count), and the
tissue threshold is tiatoolbox's OtsuTissueMasker's."""

import os
import subprocess
import sys

import pytest


@pytest.mark.skipif(not hasattr(os, "sched_setaffinity") or (os.cpu_count() or 1) < 2,
                    reason="needs CPU affinity and at least 2 cores")
def test_worker_counts_and_labels_follow_the_cpu_affinity():
    code = ("import os; os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})\n"
            "from g2l_cache.slides import worker_count_hint\n"
            "from g2l_cache.cpus import usable_cores\n"
            "from g2l_cache.build import device_label\n"
            "import torch\n"
            "from g2l_student.doctor import cpu_check\n"
            "print(usable_cores(), worker_count_hint(), device_label(torch.device('cpu')), cpu_check(1).detail)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[:2] == ["1", "0"]  # one core: no loader worker beside the process itself
    assert " ".join(out[2:5]) == "cpu (1 cores)"
    assert out[5] == "1"  # the doctor counts the same cores


def test_the_tissue_threshold_is_tiatoolboxs_otsu_masker_as_the_readme_says():
    from pathlib import Path

    import numpy as np
    import tiatoolbox
    from PIL import Image
    from tiatoolbox.tools.tissuemask import OtsuTissueMasker

    from g2l_cache.tiling import grey_levels, otsu_threshold

    rgb = np.asarray(Image.open(Path(tiatoolbox.__file__).parent / "data" / "target_image.png").convert("RGB"))
    for image in (rgb, rgb[::3, ::2], np.ascontiguousarray(rgb[200:700, 100:900])):
        grey = grey_levels(image)
        expected = OtsuTissueMasker().fit_transform([image])[0]
        assert np.array_equal(grey < otsu_threshold(grey), expected)

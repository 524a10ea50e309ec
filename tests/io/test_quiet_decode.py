"""The decoders' chatter is captured, and nothing else written to stderr meanwhile is lost.

A subprocess decodes files that make libpng and libjpeg print (a PNG whose deflate data is
broken behind valid CRCs, a JPEG whose scan data is garbage) on four threads, while another
thread writes numbered lines and a progress bar redrawn with carriage returns, as tqdm does, to
stderr. Its stderr must be byte for byte what that thread wrote: no decoder line, nothing lost,
nothing reordered -- even when a decoder line lands right after an unfinished progress bar.
"""
import os
import subprocess
import sys
from pathlib import Path

import cv2

from support.image_builders import jpeg_bytes, png_file, smooth_image

ROOT = Path(__file__).resolve().parents[2]

STRESS = """
import sys, threading, time
from concurrent.futures import ThreadPoolExecutor
from mxvision.io.quiet_decode import imdecode
files = [open(p, "rb").read() for p in sys.argv[1:]]
def talk():
    for k in range(600):
        sys.stderr.write("line %d\\n" % k)
        if k % 50 == 0:
            sys.stderr.write("\\r progress %d%%" % (k // 6))
            sys.stderr.flush()
        time.sleep(0.0005)
    sys.stderr.write("\\n")
def decode_while_talking(_):
    counts = [0, 0]
    while talker.is_alive():
        for data in files:
            counts[imdecode(data, -1)[0] is None] += 1
    return counts
talker = threading.Thread(target=talk)
talker.start()
with ThreadPoolExecutor(4) as pool:
    counts = list(pool.map(decode_while_talking, range(4)))
print(sum(c[0] for c in counts), sum(c[1] for c in counts))
"""


def expected_stderr():
    out = []
    for k in range(600):
        out.append("line %d\n" % k)
        if k % 50 == 0:
            out.append("\r progress %d%%" % (k // 6))
    return "".join(out) + "\n"


def test_chatter_is_dropped_and_every_other_byte_kept_in_order(tmp_path):
    jpg = jpeg_bytes(smooth_image(128))
    chatty = {"bad_deflate.png": png_file(128, 128, b"\x78\x9c" + bytes(range(256)) * 4),
              "garbage_scan.jpg": jpg[:400] + bytes(range(256))[::-1] * 4 + jpg[1424:],
              "good.png": cv2.imencode(".png", smooth_image(128))[1].tobytes()}
    for name, data in chatty.items():
        (tmp_path / name).write_bytes(data)
    # the files do make the decoders talk when nothing captures them
    loud = subprocess.run([sys.executable, "-c", "import sys, cv2, numpy as np\n"
                           "for p in sys.argv[1:]: cv2.imdecode(np.fromfile(p, np.uint8), -1)",
                           *[str(tmp_path / n) for n in chatty]], capture_output=True, text=True, timeout=60)
    assert "libpng error" in loud.stderr and "Corrupt JPEG data" in loud.stderr, loud.stderr
    proc = subprocess.run([sys.executable, "-c", STRESS, *[str(tmp_path / n) for n in chatty]],
                          capture_output=True, timeout=120, cwd=str(ROOT),
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    decoded, refused = map(int, proc.stdout.split())
    assert refused > 100 and decoded >= 2 * refused  # the PNG and the corrupt JPEG decode
    assert proc.stderr.decode() == expected_stderr()

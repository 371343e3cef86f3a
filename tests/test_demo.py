"""The README's first command runs `retrieval demo`: real queries answered by a real server."""

import re

from retrieval.cli import main


def test_demo_builds_serves_queries_and_stops(capsys):
    assert main(["demo", "--k", "3"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"published v0001: 15 images, 15 captions", out)
    assert re.search(r"serving v0001 at 127\.0\.0\.1:\d+", out)
    # every text query lists 3 images, every image query 3 captions, with cosines, angles and the
    # calibrated model's match probabilities
    assert (
        len(re.findall(r"^\s+\d\. cos [+-]\d\.\d{4}\s+\d+\.\d{2}°(?:\s+p \d\.\d{2})?\s+#\d+\s+\S+\.jpg$", out, re.M))
        == 4 * 3
    )
    assert len(re.findall(r"^\s+\d\. cos .*'.+'\s+\[\S+\.jpg\]$", out, re.M)) == 2 * 3
    # the trained model finds the obvious ones
    assert re.search(r"text -> image: 'a motorbike'\n\s+1\. .*stereo_motorcycle\.jpg", out)
    assert re.search(r"image -> text: rocket\.jpg\n\s+1\. .*'A rocket stands", out)
    assert out.rstrip().endswith("server stopped; demo done.")

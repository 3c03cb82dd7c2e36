"""Video output paths: the extension and the folder are checked before anything is generated."""

import numpy as np
import pytest
from dit_sparse.pipelines.video_io import VIDEO_EXTENSIONS, OutputPathError, check_video_path, write_video


@pytest.mark.parametrize("name", ["v.mp4", "v.gif", "V.MP4", "sub/dir/v.Gif"])
def test_accepted_names_pass_and_create_the_folder(tmp_path, name):
    path = check_video_path(tmp_path / name)
    assert path == tmp_path / name and path.parent.is_dir()


@pytest.mark.parametrize("name, says", [("v.txt", "extension '.txt'"), ("video", "no extension")])
def test_other_names_are_refused_with_the_accepted_extensions(tmp_path, name, says):
    with pytest.raises(OutputPathError) as exc:
        check_video_path(tmp_path / name)
    text = str(exc.value)
    assert says in text and all(ext in text for ext in VIDEO_EXTENSIONS)


def test_a_folder_is_refused_with_a_file_name_to_use(tmp_path):
    with pytest.raises(OutputPathError, match="is a folder; give a file name such as"):
        check_video_path(tmp_path)


def test_write_video_refuses_a_bad_extension_before_writing_anything(tmp_path):
    frames = np.zeros((2, 8, 8, 3), dtype=np.float32)
    with pytest.raises(OutputPathError, match=".mp4 or .gif"):
        write_video(frames, tmp_path / "v.txt")
    assert not any(tmp_path.iterdir())
    assert write_video(frames, tmp_path / "v.gif").stat().st_size > 0

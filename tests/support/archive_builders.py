"""Building test archives (tar) with exactly the members a test wants, hostile ones included."""
import io
import tarfile


def make_tar(path, members, mode="w:gz"):
    """members: (name, tarfile type, bytes for files / link target for links, declared size)."""
    with tarfile.open(path, mode) as tf:
        for member in members:
            name, kind, arg = member[:3]
            info = tarfile.TarInfo(name)
            info.type = kind
            if kind == tarfile.REGTYPE:
                info.size = len(arg)
                tf.addfile(info, io.BytesIO(arg))
            else:
                info.linkname = arg or ""
                tf.addfile(info)
    return path

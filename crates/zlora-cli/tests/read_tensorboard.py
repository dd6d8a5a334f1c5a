"""Reads a run's TensorBoard folder with TensorBoard's own readers and prints it as JSON.

Every record of every event file goes through the record reader TensorBoard uses without
TensorFlow (a wrong checksum or a cut record raises), then the folder through the
EventAccumulator with purging off, so that an event left over from before a resume shows.
Output: {"file_versions": [...], "scalars": {tag: [[step, value], ...]},
"images": [[tag, step, width, height, png hex], ...]}.
"""

import glob
import json
import os
import sys

from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.compat.proto import event_pb2
from tensorboard.compat.tensorflow_stub import errors, pywrap_tensorflow


def file_versions(folder):
    versions = []
    for path in sorted(glob.glob(os.path.join(folder, "events.out.tfevents.*"))):
        reader = pywrap_tensorflow.PyRecordReader_New(path)
        first = None
        while True:
            try:
                reader.GetNext()
            except errors.OutOfRangeError:
                break
            event = event_pb2.Event.FromString(reader.record())
            first = first or event.file_version
        versions.append(first)
    return versions


def main(folder):
    acc = ea.EventAccumulator(
        folder,
        size_guidance={ea.SCALARS: 0, ea.IMAGES: 0},
        purge_orphaned_data=False,
    )
    acc.Reload()
    tags = acc.Tags()
    print(
        json.dumps(
            {
                "file_versions": file_versions(folder),
                "scalars": {
                    t: [[e.step, e.value] for e in acc.Scalars(t)] for t in tags[ea.SCALARS]
                },
                "images": [
                    [t, e.step, e.width, e.height, e.encoded_image_string.hex()]
                    for t in tags[ea.IMAGES]
                    for e in acc.Images(t)
                ],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])

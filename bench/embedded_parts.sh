#!/bin/bash
# The embedded model (94 MB) is larger than what one device call carries (64 MiB with the tree),
# so it travels in two parts, one a call, on one warm machine:
#   here:    bash bench/embedded_parts.sh K        (K = 1 or 2: puts part K in .embedded/, ignored)
#   device:  part 1: "bash bench/device_call.sh embedded-part" with carry [".embedded"] (no wheels:
#            the part and the tree just fit in the carry limit); part 2 with carry [".whl", ".embedded"]
#            and the mode that needs the model after it, e.g.
#            "bash bench/device_call.sh embedded-part && bash bench/device_call.sh session6"
set -euo pipefail
part=${1:?part 1 or 2}
gguf=$(.venv/bin/python -c "from stepserve.models.source import embedded_model_path; print(embedded_model_path())")
rm -rf .embedded && mkdir -p .embedded
size=$(stat -c %s "$gguf")
chunk=$(( (size + 1) / 2 ))
dd if="$gguf" of=".embedded/part-$part" bs=1M iflag=skip_bytes,count_bytes skip=$(( (part - 1) * chunk )) count=$chunk status=none
sha256sum "$gguf" | cut -d' ' -f1 > .embedded/sha256
ls -l .embedded

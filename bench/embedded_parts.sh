#!/bin/bash
# The embedded model's GGUF (94 MB) in two parts, for a lent device machine whose call carries
# at most 64 MiB with the working tree; bench/device_call.sh joins them there (its setup). Part 1
# is the larger (60 MB: it travels with the tree alone), part 2 the rest (it travels with the
# wheels, 15 MB).
#   here:    bash bench/embedded_parts.sh K        (K = 1 or 2: puts part K in .embedded/, ignored)
#   device:  part 1: "bash bench/device_call.sh setup" with carry [".embedded"] (no wheels: the
#            part and the tree fill the carry limit; work that needs only torch and triton, such
#            as the kernel sweeps, can share the call); then, on the same warm machine,
#            part 2 with carry [".whl", ".embedded"] and the mode that needs the model, e.g.
#            "bash bench/device_call.sh tests"
set -euo pipefail
part=${1:?part 1 or 2}
gguf=$(.venv/bin/python -c "from stepserve.checkpoint.source import embedded_model_path; print(embedded_model_path())")
rm -rf .embedded && mkdir -p .embedded
size=$(stat -c %s "$gguf")
first=60000000
if [ "$part" = 1 ]; then skip=0 count=$first; else skip=$first count=$(( size - first )); fi
dd if="$gguf" of=".embedded/part-$part" bs=1M iflag=skip_bytes,count_bytes skip=$skip count=$count status=none
sha256sum "$gguf" | cut -d' ' -f1 > .embedded/sha256
ls -l .embedded

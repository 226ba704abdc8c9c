"""Run by a Python that has the ``kserve`` package (it needs protobuf<7, so not stepserve's own
environment): KServe's InferenceGRPCClient and InferenceRESTClient against a live stepserve.

    python tests/kserve_client_check.py GRPC_ADDRESS HTTP_URL MODEL   -> prints one JSON line
"""

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def request(model: str, binary_data: bool) -> InferRequest:
    text = InferInput("text_input", [2], "BYTES")
    text.set_data_from_numpy(np.array([b"hello", b"there"], dtype=np.object_), binary_data=binary_data)
    return InferRequest(
        model_name=model,
        infer_inputs=[text],
        request_id="k-1",
        parameters={"max_tokens": 4, "temperature": 0, "ignore_eos": True},
    )


def texts(response) -> list[str]:
    (output,) = [o for o in response.outputs if o.name == "text_output"]
    return [t.decode() if isinstance(t, bytes) else t for t in output.data]


async def main(grpc_address: str, http_url: str, model: str) -> dict:
    grpc_client = InferenceGRPCClient(grpc_address, timeout=60)
    ready = await grpc_client.is_server_ready() and await grpc_client.is_model_ready(model)
    grpc_texts = texts(await grpc_client.infer(request(model, binary_data=True)))  # raw_input_contents
    await grpc_client.close()
    rest_client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    # JSON data: the REST binary-data extension (binary_data=True, the default) is not served
    rest_texts = texts(await rest_client.infer(http_url, request(model, binary_data=False), model_name=model))
    await rest_client.close()
    return {"ready": ready, "grpc": grpc_texts, "rest": rest_texts}


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main(*sys.argv[1:4]))))

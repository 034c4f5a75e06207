"""The client bench/serve_load.py runs under locust: POST one photo to /v1/analyze, again and again; a 429 is counted
as a failure named "429" and the client waits its Retry-After, as a well-behaved client does."""

import os

import gevent
from locust import FastHttpUser, constant, task

PHOTO = open(os.environ["SOFTBIO_BENCH_PHOTO"], "rb").read()  # noqa: SIM115 - read once per locust process


class PhotoClient(FastHttpUser):
    wait_time = constant(0)

    @task
    def analyze(self) -> None:
        headers = {"Content-Type": "image/jpeg"}
        with self.client.post(
            "/v1/analyze?detector=haar", data=PHOTO, headers=headers, catch_response=True
        ) as response:
            if response.status_code == 429:
                response.failure("429")
                gevent.sleep(float(response.headers.get("Retry-After", "1")))
            elif response.status_code != 200:
                response.failure(f"status {response.status_code}")

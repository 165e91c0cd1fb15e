"""A real S3 API on loopback for the tests: moto's server (S3 and IAM), authentication on.

Every request is signed and checked against moto's IAM, as a real store checks it: an unknown
key is refused, and a user whose policy lacks s3:PutObject cannot write. Two users: `admin`
(everything; the session's default credentials) and `reader` (get and list only).
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass

ALL = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
# AWS authorizes HeadObject by s3:GetObject; moto asks for an action "s3:HeadObject" of its own
# (no such IAM action exists), so the reader's policy names it too.
READ_ONLY = {"Version": "2012-10-17", "Statement": [
    {"Effect": "Allow", "Action": ["s3:GetObject", "s3:HeadObject", "s3:ListBucket", "s3:GetBucketLocation"],
     "Resource": "*"}]}
REGION = "us-east-1"


@dataclass
class S3Server:
    endpoint: str
    admin: tuple[str, str]  # access key id, secret
    reader: tuple[str, str]
    moto: object = None  # the ThreadedMotoServer

    def stop(self) -> None:
        """An outage: nothing answers at the endpoint (the store's content is kept in memory)."""
        self.moto.stop()

    def restart(self) -> None:
        """The store is back, at the same endpoint, with the same buckets, users and objects."""
        from moto.server import ThreadedMotoServer

        host, port = self.endpoint.rsplit("//", 1)[1].split(":")
        self.moto = ThreadedMotoServer(ip_address=host, port=int(port), verbose=False)
        self.moto.start()

    def env(self, keys: tuple[str, str] | None = None) -> dict[str, str]:
        """The standard AWS variables a process needs to use this store with `keys` (admin's)."""
        key, secret = keys or self.admin
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret,
                "AWS_REGION": REGION, "AWS_EC2_METADATA_DISABLED": "true",
                # A developer's own ~/.aws never leaks into a test.
                "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent/aws-credentials", "AWS_CONFIG_FILE": "/nonexistent/aws-config"}

    def client(self, service: str = "s3"):
        import boto3

        key, secret = self.admin
        return boto3.client(service, endpoint_url=self.endpoint, region_name=REGION,
                            aws_access_key_id=key, aws_secret_access_key=secret)

    def new_bucket(self) -> str:
        name = f"rsr-{uuid.uuid4().hex[:12]}"
        self.client().create_bucket(Bucket=name)
        return name

    def keys(self, bucket: str, prefix: str = "") -> list[str]:
        pages = self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        return sorted(o["Key"] for page in pages for o in page.get("Contents", []))

    def read(self, bucket: str, key: str) -> bytes:
        return self.client().get_object(Bucket=bucket, Key=key)["Body"].read()

    def checkpointed_epochs(self, bucket: str, prefix: str = "runs/") -> list[int]:
        """The epochs of the Ray Train checkpoints under `prefix` (their state.json objects)."""
        return sorted(json.loads(self.read(bucket, key))["epoch"] for key in self.keys(bucket, prefix)
                      if key.endswith("/state.json") and "/checkpoint_" in key)


def start_server() -> S3Server:
    """moto's server on 127.0.0.1, a free port, with its two users."""
    import boto3
    import moto.settings
    from moto.server import ThreadedMotoServer

    # The first three requests (the admin user, its policy, its key) go unchecked; every later
    # one must be signed by a known key and allowed by its user's policy.
    moto.settings.INITIAL_NO_AUTH_ACTION_COUNT = 3
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"

    def user(name: str, policy: dict, keys: tuple[str, str]) -> tuple[str, str]:
        iam = boto3.client("iam", endpoint_url=endpoint, region_name=REGION,
                           aws_access_key_id=keys[0], aws_secret_access_key=keys[1])
        iam.create_user(UserName=name)
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return key["AccessKeyId"], key["SecretAccessKey"]

    admin = user("admin", ALL, ("unchecked", "unchecked"))
    reader = user("reader", READ_ONLY, admin)
    return S3Server(endpoint=endpoint, admin=admin, reader=reader, moto=server)

"""Full-ImageNet preparation time on cluster.yaml's `cpu.spot` nodes (4 x c6i.8xlarge), projected
from benchmarks/prepare_listing.py's measured figures and a few stated AWS numbers.

Every step is written out as arithmetic in the result, so docs/aws.md can quote it and a reader
can redo it with other assumptions. What is measured comes from the benchmark; what is assumed
is in ASSUMED with its source.
"""
from __future__ import annotations

TRAIN_IMAGES, VAL_IMAGES, CLASS_TARS = 1_281_167, 50_000, 1000
TRAIN_TAR_BYTES = 147_897_477_120  # ILSVRC2012_img_train.tar, 137.7 GiB
VAL_TAR_BYTES = 6_744_924_160      # ILSVRC2012_img_val.tar, 6.3 GiB
NODES, VCPUS_PER_NODE = 4, 32      # cluster.yaml: cpu.spot, max_workers 4, c6i.8xlarge
ASSUMED = {
    "s3_request_latency_s": (0.030, "first-byte latency of one S3 GET in-region (typ. 10-50 ms)"),
    "s3_stream_bytes_per_s": (90e6, "one S3 GET stream, large object, in-region"),
    "node_network_bytes_per_s": (12.5e9 / 8, "c6i.8xlarge: 12.5 Gbit/s network"),
    "s3_get_per_s_per_prefix": (5500, "AWS S3 docs: >= 5,500 GET/HEAD per second per prefix; "
                                      "every image lives in one object, so one prefix"),
    "listing_task_requests_per_class_tar": (2, "one HEAD (open) + one GET (the class tar, "
                                               "148 MB < 512 MB) per task"),
}


def _value(name: str) -> float:
    return ASSUMED[name][0]


def _listing(measured: dict) -> tuple[dict, list[str]]:
    """Seconds of the train listing (outer headers, class tars) and the val listing."""
    latency, stream = _value("s3_request_latency_s"), _value("s3_stream_bytes_per_s")
    network = NODES * _value("node_network_bytes_per_s")
    cpus = NODES * VCPUS_PER_NODE
    outer_s = CLASS_TARS * latency  # one request per ~148 MB member header, one after another
    per_task_s = TRAIN_TAR_BYTES / CLASS_TARS / stream + latency
    inner_s = max(TRAIN_TAR_BYTES / network, -(-CLASS_TARS // cpus) * per_task_s,
                  TRAIN_IMAGES / (cpus * measured["listing_images_per_s_per_core"]))
    val_requests = -(-VAL_TAR_BYTES // (1 << 25))
    val_s = VAL_TAR_BYTES / stream + val_requests * latency  # one sequential reader
    requests = CLASS_TARS + CLASS_TARS * _value("listing_task_requests_per_class_tar") + \
        val_requests + 3
    lines = [
        f"train outer headers: {CLASS_TARS} sequential requests x {latency * 1e3:.0f} ms = "
        f"{outer_s:.0f} s",
        f"train class tars: max(network {TRAIN_TAR_BYTES / 1e9:.1f} GB / "
        f"{network / 1e9:.2f} GB/s = {TRAIN_TAR_BYTES / network:.0f} s, streams "
        f"{-(-CLASS_TARS // cpus)} waves x {per_task_s:.2f} s = "
        f"{-(-CLASS_TARS // cpus) * per_task_s:.0f} s, CPU {TRAIN_IMAGES:,} / ({cpus} x "
        f"{measured['listing_images_per_s_per_core']}/s) = "
        f"{TRAIN_IMAGES / (cpus * measured['listing_images_per_s_per_core']):.0f} s) = "
        f"{inner_s:.0f} s",
        f"val tar: {VAL_TAR_BYTES / 1e9:.2f} GB / {stream / 1e6:.0f} MB/s + {val_requests} "
        f"requests x {latency * 1e3:.0f} ms = {val_s:.0f} s (one reader)",
        f"listing requests: {CLASS_TARS} + {CLASS_TARS} x "
        f"{_value('listing_task_requests_per_class_tar')} + {val_requests} + 3 = {requests:,} "
        f"for {TRAIN_IMAGES + VAL_IMAGES:,} images = "
        f"{requests / (TRAIN_IMAGES + VAL_IMAGES):.4f} per image"]
    return {"outer_s": outer_s, "inner_s": inner_s, "val_s": val_s,
            "requests_per_image": requests / (TRAIN_IMAGES + VAL_IMAGES)}, lines


def _conversion(measured: dict) -> tuple[float, list[str]]:
    """Seconds of the conversion: the slowest of CPU, S3's request rate and the network."""
    images, cpus = TRAIN_IMAGES + VAL_IMAGES, NODES * VCPUS_PER_NODE
    rate = measured["conversion_images_per_s_per_core"]
    cpu_s = images / (cpus * rate)
    gets = images * measured["conversion_requests_per_image"]
    rate_s = gets / _value("s3_get_per_s_per_prefix")
    network_s = (TRAIN_TAR_BYTES + VAL_TAR_BYTES) / (NODES * _value("node_network_bytes_per_s"))
    seconds = max(cpu_s, rate_s, network_s)
    lines = [f"conversion: max(CPU {images:,} / ({cpus} x {rate}/s) = {cpu_s:.0f} s, S3 rate "
             f"{gets:,.0f} requests / {_value('s3_get_per_s_per_prefix'):,}/s = {rate_s:.0f} s, "
             f"network {network_s:.0f} s) = {seconds:.0f} s (8 reads in flight per task hide "
             f"the {_value('s3_request_latency_s') * 1e3:.0f} ms latency: "
             f"{_value('s3_request_latency_s') * 1e3 / 8:.1f} ms per image < "
             f"{1e3 / rate:.1f} ms of CPU)"]
    return seconds, lines


def project(measured: dict, phases: dict, shape: dict) -> dict:
    """The projected minutes for full ImageNet, with the arithmetic and the assumptions."""
    listing, lines = _listing(measured)
    conversion_s, conversion_lines = _conversion(measured)
    overhead_s = phases["ray_init"]["seconds"]
    total_s = listing["outer_s"] + listing["inner_s"] + listing["val_s"] + conversion_s + \
        overhead_s
    lines += conversion_lines + [
        f"total: {listing['outer_s']:.0f} + {listing['inner_s']:.0f} + {listing['val_s']:.0f} + "
        f"{conversion_s:.0f} + {overhead_s:.0f} (Ray start, measured) = {total_s:.0f} s = "
        f"{total_s / 60:.1f} min on {NODES} x c6i.8xlarge ({NODES * VCPUS_PER_NODE} vCPUs), "
        "once the nodes are up (the autoscaler's 2-5 min to start spot nodes not included)",
        f"rerun after a crash: the listing comes from _plan.json "
        f"({measured['listing_requests_per_image_warm']} requests per image measured) and "
        "finished shards are skipped"]
    return {"minutes": round(total_s / 60, 1), "goal_minutes": 30,
            "listing_requests_per_image_imagenet": round(listing["requests_per_image"], 5),
            "arithmetic": lines,
            "assumed": {k: {"value": v, "why": why} for k, (v, why) in ASSUMED.items()},
            "measured_on": f"{shape['classes']} classes x "
                           f"{shape['train_images'] // shape['classes']} images"}

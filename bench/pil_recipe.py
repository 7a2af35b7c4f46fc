"""The UDI crop recipe on PIL images, as torchvision's transforms run it (udi-spec §1.3-1.4).

Two commands, both reading images as a blob of length-prefixed payloads (u32 little-endian
length, then the JPEG/PNG bytes), which is how `loader bench` and the loader's Pillow test hand
over the records:

  bench BLOB CONFIG_JSON PASSES SEED
      Decodes every image and makes its 2 + n_local crops with the recipe's random draws
      (RandomResizedCrop: crop, then resize BICUBIC; RandomHorizontalFlip; ColorJitter through
      ImageEnhance in a random order; RandomGrayscale; GaussianBlur; solarize), single-threaded,
      and prints one JSON line: images, wall_s, cpu_s. The crops stay PIL images (no ToTensor or
      Normalize: the loader's output is uint8 crops too). torchvision itself is not needed: each
      op below is the PIL call torchvision's functional API makes (adjust_hue goes through numpy
      there; here the same uint8 shift is a `point` table). The overlap constraint of the second
      view and the locals is plain RandomResizedCrop here: it moves a box, it costs no pixels.

  replay BLOB SPEC_JSON OUT
      Applies decisions recorded by the loader (per image: crop boxes, flips, photometric
      records) and writes, per image, the decoded RGB bytes, then every crop after crop + resize
      + flip, then every finished crop, all concatenated into OUT.
"""

import io
import json
import math
import random
import struct
import sys
import time

from PIL import Image, ImageEnhance, ImageFilter, ImageOps

BRIGHTNESS, CONTRAST, SATURATION, HUE = 0, 1, 2, 3
JITTER, GRAYSCALE, BLUR, SOLARIZE = 1, 2, 4, 8


def payloads(path):
    data = open(path, "rb").read()
    out, at = [], 0
    while at < len(data):
        (n,) = struct.unpack_from("<I", data, at)
        out.append(data[at + 4 : at + 4 + n])
        at += 4 + n
    return out


def decode(data):
    img = Image.open(io.BytesIO(data))
    if img.mode != "RGB":
        img = img.convert("RGB")
    img.load()
    return img


def crop_resize_flip(img, left, top, w, h, size, flip):
    """torchvision F.resized_crop on PIL (crop, then resize), then F.hflip."""
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    return out.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else out


def adjust_hue(img, factor):
    h, s, v = img.convert("HSV").split()
    shift = int(factor * 255) % 256  # np.uint8(hue_factor * 255), added with uint8 wrap-around
    h = h.point([(i + shift) % 256 for i in range(256)])
    return Image.merge("HSV", (h, s, v)).convert("RGB")


def photometric(img, rec):
    if rec["flags"] & JITTER:
        for op in rec["order"]:
            if op == BRIGHTNESS:
                img = ImageEnhance.Brightness(img).enhance(rec["brightness"])
            elif op == CONTRAST:
                img = ImageEnhance.Contrast(img).enhance(rec["contrast"])
            elif op == SATURATION:
                img = ImageEnhance.Color(img).enhance(rec["saturation"])
            else:
                img = adjust_hue(img, rec["hue"])
    if rec["flags"] & GRAYSCALE:
        img = img.convert("L").convert("RGB")
    if rec["flags"] & BLUR:
        img = img.filter(ImageFilter.GaussianBlur(radius=rec["blur_sigma"]))
    if rec["flags"] & SOLARIZE:
        img = ImageOps.solarize(img, threshold=128)
    return img


def rrc_box(rng, width, height, scale, ratio):
    """torchvision RandomResizedCrop.get_params."""
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    w, h = min(width, height), min(width, height)
    return (width - w) // 2, (height - h) // 2, w, h


def draw_photo(rng, cfg):
    rec = {"flags": 0}
    if rng.random() <= cfg["jitter_p"]:
        rec["flags"] |= JITTER
        order = [0, 1, 2, 3]
        rng.shuffle(order)
        rec["order"] = order
        for key in ("brightness", "contrast", "saturation"):
            rec[key] = rng.uniform(max(0.0, 1 - cfg[key]), 1 + cfg[key])
        rec["hue"] = rng.uniform(-cfg["hue"], cfg["hue"])
    if rng.random() < cfg["grayscale_p"]:
        rec["flags"] |= GRAYSCALE
    blur_p, solarize_p = cfg["blur_p_global2"], 0.0
    if rng.random() < 0.5:
        blur_p = cfg["blur_p_local"] if rng.random() < 0.5 else cfg["blur_p_global1"]
    else:
        solarize_p = cfg["solarize_p"]
    if rng.random() <= blur_p:
        rec["flags"] |= BLUR
        rec["blur_sigma"] = rng.uniform(*cfg["blur_sigma"])
    if solarize_p > 0 and rng.random() < solarize_p:
        rec["flags"] |= SOLARIZE
    return rec


def bench(blob, cfg, passes, seed):
    data = payloads(blob)
    rng = random.Random(seed)
    images = 0
    wall0, cpu0 = time.perf_counter(), time.process_time()
    for _ in range(passes):
        for payload in data:
            img = decode(payload)
            for k in range(2 + cfg["n_local"]):
                glob = k < 2
                size = cfg["global_size"] if glob else cfg["local_size"]
                scale = cfg["global_scale"] if glob else cfg["local_scale"]
                left, top, w, h = rrc_box(rng, img.width, img.height, scale, cfg["ratio"])
                flip = (glob or cfg["local_hflip"]) and rng.random() < cfg["hflip_p"]
                crop = crop_resize_flip(img, left, top, w, h, size, flip)
                photometric(crop, draw_photo(rng, cfg))
            images += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    print(json.dumps({"images": images, "wall_s": wall, "cpu_s": cpu, "pillow": Image.__version__}))


def replay(blob, spec_path, out_path):
    spec = json.load(open(spec_path))
    with open(out_path, "wb") as out:
        for payload, item in zip(payloads(blob), spec):
            img = decode(payload)
            out.write(img.tobytes())
            crops = [crop_resize_flip(img, *c) for c in item["crops"]]
            for c in crops:
                out.write(c.tobytes())
            for c, rec in zip(crops, item["photo"]):
                out.write(photometric(c, rec).tobytes())


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    if cmd == "bench":
        bench(args[0], json.loads(open(args[1]).read()), int(args[2]), int(args[3]))
    elif cmd == "replay":
        replay(*args)
    else:
        sys.exit(f"unknown command {cmd!r} (bench or replay)")

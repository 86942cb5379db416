#!/usr/bin/env python3
"""Builds dsocr for the browser with the settings in wasm-pack.toml.

Steps: `cargo rustc --lib --crate-type cdylib` for wasm32-unknown-unknown with the configured features and
profile; then wasm-bindgen (ES module + .d.ts into the configured out-dir: the npm package's dist/wasm) and
binaryen's wasm-opt (skipped with a warning when it is not installed).

  python3 www/build.py              # all steps (needs wasm-bindgen-cli of the crate's wasm-bindgen version)
  python3 www/build.py --cargo-only # only the wasm32 compile
  python3 www/build.py --skip-opt   # without wasm-opt (what CI uses for the browser tests)
"""

import argparse
import pathlib
import shutil
import subprocess
import sys
import tomllib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, cwd=ROOT, check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cargo-only", action="store_true", help="stop after the wasm32 compile")
    parser.add_argument("--skip-opt", action="store_true", help="skip wasm-opt (faster; CI)")
    args = parser.parse_args()
    settings = tomllib.loads((ROOT / "wasm-pack.toml").read_text())
    build, bindgen, opt = settings["build"], settings["bindgen"], settings.get("wasm-opt", {})

    cargo = ["cargo", "rustc", "--lib", "--crate-type", "cdylib", "-p", build["crate"],
             "--target", build["target"], "--profile", build["profile"]]
    if not build.get("default-features", True):
        cargo.append("--no-default-features")
    if build.get("features"):
        cargo += ["--features", ",".join(build["features"])]
    run(cargo)
    profile_dir = "debug" if build["profile"] == "dev" else build["profile"]
    wasm = ROOT / "target" / build["target"] / profile_dir / f"{build['crate'].replace('-', '_')}.wasm"
    print(f"built {wasm} ({wasm.stat().st_size / 1e6:.1f} MB)")
    if args.cargo_only:
        return 0

    if shutil.which("wasm-bindgen") is None:
        sys.exit("wasm-bindgen not found: cargo install wasm-bindgen-cli --version <the crate's wasm-bindgen version>")
    out_dir = ROOT / bindgen["out-dir"]
    cmd = ["wasm-bindgen", "--target", bindgen["target"], "--out-dir", str(out_dir), "--out-name", bindgen["out-name"]]
    if not bindgen.get("typescript", True):
        cmd.append("--no-typescript")
    run(cmd + [str(wasm)])
    level = "" if args.skip_opt else opt.get("level", "")
    if level:
        bg = out_dir / f"{bindgen['out-name']}_bg.wasm"
        if shutil.which("wasm-opt") is None:
            print("warning: wasm-opt not found, the .wasm is not size-optimised (apt-get install binaryen)", file=sys.stderr)
        else:
            run(["wasm-opt", f"-{level}", str(bg), "-o", str(bg)])
    print(f"browser package in {out_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

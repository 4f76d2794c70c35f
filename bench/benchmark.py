"""bench/run's entry point; the benchmark is the package bench/junebug_bench/.

bench/run [--quick] [options]    (bench/run --help lists them)
"""

from junebug_bench.main import run

if __name__ == "__main__":
    run()

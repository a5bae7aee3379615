"""The smallest worker: logs a line every interval."""

from uniphant import main


def work(config, logger, connection):
    logger.info("hello from worker %s on %s", config["worker_id"], config["host_name"])


if __name__ == "__main__":
    main(work)

"""Drains the `jobs` table (workers/examples/jobs.sql), one job per transaction.

Any number of these workers can run at once, on any hosts: FOR UPDATE SKIP
LOCKED hands each pending job to exactly one of them, and a worker that dies
mid-job leaves it pending, because its transaction rolls back.  Between jobs
the worker asks alive(), so a stop never waits for the queue to empty.
"""

from uniphant import alive, main

CLAIM = """
    SELECT id, payload FROM jobs WHERE done_at IS NULL
    ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED
"""
FINISH = "UPDATE jobs SET done_at = now(), done_by = %s::uuid WHERE id = %s"


def work(config, logger, connection):
    cursor = connection.cursor()
    while alive(config, connection):
        cursor.execute("BEGIN")
        cursor.execute(CLAIM)
        job = cursor.fetchone()
        if job is None:
            cursor.execute("COMMIT")
            return  # the queue is empty: come back after an interval
        logger.info("job %d: %s", job[0], job[1])  # the work itself
        cursor.execute(FINISH, (config["process_id"], job[0]))
        cursor.execute("COMMIT")


if __name__ == "__main__":
    main(work)

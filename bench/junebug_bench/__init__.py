"""Throughput, latency, CPU and memory of junebug-api, with exactly-once checks.

Not a test and not run by CI. Run it through its wrapper, which makes the
virtualenv and installs nginx-light and wrk when they are missing::

    bench/run [--quick] [--concurrency N] [--inbound N] [--events N] [--keep-tmp]
              [--state-cache memory|redis] [--processes N] [--balancer]
              [--phases outbound,inbound,events,bare,roundtrip] [--event-url] [--no-lazy-queues]
    bench/run --compare-scaling
    bench/run --compare-channels 100 [--quick]
    bench/run --compare-caches [--quick]
    bench/run --compare-metrics [other options]
    bench/run --compare-channel-api [other options]
    bench/run [--tls] [--compare-code REF]

Everything it starts lives in a temporary directory and talks over 127.0.0.1
only; the shared RabbitMQ on 5672 is never touched:

- its own RabbitMQ node (``jbbench-<random>@localhost``, free AMQP and
  distribution ports, data, logs and pid file in the temporary directory, no
  plugins, an empty config file so /etc/rabbitmq/rabbitmq.conf's listener on
  5672 does not apply), pinned to core 1, with a ``queue-mode: lazy`` policy
  on ``bench.outbound``, which nothing consumes during a run (see
  ``RabbitNode.lazy_outbound_queue``; ``--no-lazy-queues`` leaves it out);
- nginx (one worker, core 1) as the RapidPro sink: a front server that logs
  every request body (``escape=json``) to bodies.log and proxies to a backend
  server answering ``200 {}``;
- the service, ``twistd -n junebug-api``, pinned to core 0; wrk on core 1.
  With ``--processes N`` it starts N service processes with the same
  connector_name and config but each its own http_bind port, all of them on
  core 0 (``taskset -c 0``): they share the one core a single process has, so
  the comparison with one process is about the work, not about more CPU.
  Outbound requests then go through a second nginx (one worker, core 1) that
  balances over the processes (upstream keepalive 64), and the same balancer
  in front of one process is measured too, so both figures pay for it
  (``--balancer`` puts it in front of a single process as well).

``--state-cache redis`` configures ``junebug_api.state_cache.RedisStateCache``
with the shared Redis (redis://127.0.0.1:6379/15) and the key prefix
``jbbench:<random>:``; only keys under that prefix are deleted at the end
(SCAN MATCH + DEL), and the Redis round trip is measured on its own: SET+GET
pairs from a Twisted script with the service's client (and txredisapi and
redis-py for comparison), one at a time and 50 in flight.

Phases (``--phases``, default all): a bare twisted.web server
(bench/bare_server.py) under wrk at 1, 16 and 64 connections as the HTTP
ceiling; outbound POSTs under wrk at the same connection counts, each after a
short warm-up run (every answer must be 201, and ``bench.outbound`` must hold
one message per 201: wrk does not count the request each connection has in
flight when time is up, which the service may still publish, so up to one
extra message per connection is reported, loudly, but not as a failure); N
pre-loaded inbound messages drained to nginx by all service processes (each
``message_id`` must arrive exactly once, as the expected Junebug JSON; the
rate counts from the first process's start); N pre-loaded events drained the
same way; the session round trip (below). CPU per op is the sum over the
service processes. It prints one table and writes it to
bench/last-results.txt. The exit status is 1 when a check failed.

``--compare-caches`` runs one process with the in-memory cache and one with
Redis against one RabbitMQ node and sink: outbound with ``event_url`` at 1 and
64 connections, inbound, and the session round trip (``roundtrip`` phase,
bench/roundtrip.py: inbound published at 200 and 1,000 sessions/s and higher
steps, a peer process playing the transport and a RapidPro that replies at
once, the time from the inbound's publish to the reply on ``bench.outbound``),
then the Redis/memory ratios.

``--tls`` runs the same phases once more with the service connected over
amqps (the node gets a TLS listener with a certificate from a CA made with
trustme); ``--compare-code REF`` once more with the junebug_api of git ref
REF (``git archive`` into the temporary directory, first on PYTHONPATH), so
two versions are compared against the same node and sink in one run (e.g.
the commit before the separate publish and consume connections).

``--compare-scaling`` runs, against one RabbitMQ node and sink: 1 process with
the in-memory cache, 1 process with Redis, 2 processes with Redis, each for
outbound @64 (through the balancer, with ``event_url`` in every request so
the cache is written) and inbound (20,000 messages), with --quick durations,
then the Redis round trip, and prints one small table.

``--compare-channels N`` runs, against one RabbitMQ node and sink, one process
serving one channel, then one serving that busy channel beside N-1 idle
``channels:`` entries: start-up time (launch to healthy), idle RSS (and so the
RSS per idle channel), outbound @64 and the inbound drain of the busy channel,
and the N-channel rates as a share of the one-channel ones.
``--compare-metrics`` runs the chosen phases twice in one run, against one
RabbitMQ node and sink: with metrics on (the default), then with
``metrics_enabled: false`` (rows marked ``[metrics off]``), and adds a line
per phase with the difference in rate. What runs twice is the configuration
the options describe (its processes, cache, balancer); the ``--tls`` and
``--compare-code`` ones run once, with metrics on, and are not compared.
``--compare-channel-api`` does the same with ``channel_api`` off, then on
(an admin token, channels kept in Redis or a channels file, the store polled
every second; rows marked ``[channel_api]``): its cost to a channel's
messages (issue 21 asks for at most 5% apart at outbound @64 and inbound).

The package, one module per concern: ``plan`` (the command line: setups,
phases, durations), ``rabbitmq``, ``nginx``, ``redis_keys`` and ``services``
(the nodes it starts or uses), ``load`` (wrk, pre-loaded queues, the Redis
round-trip driver) and ``messages`` (what is pre-loaded, what must arrive),
``phases``, ``accounting`` (CPU and memory from /proc, the checks behind each
status), ``results`` and ``report`` (the table and the notes), ``main`` (the
steps of a run in order), and under them ``settings`` (paths, cores, the
connector and its queue names), ``host`` (commands, free ports, probes) and
``console`` (what a run says, the error that ends it). bench/roundtrip.py
(the round-trip phase; it runs bench/roundtrip_peer.py, the transport and
RapidPro in one process) and bench/cache_memory.py (the inbound message)
stay scripts beside the package and are imported from there.
"""

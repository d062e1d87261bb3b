"""appliance.ae.turns: work one at a time per key, in order, handed over without recursion."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance.ae.turns import Turns


class TurnsTests(SynchronousTestCase):

    def test_one_at_a_time_in_order_per_key(self):
        turns, started, gates = Turns(), [], {}

        def work(name):
            def run():
                started.append(name)
                gates[name] = defer.Deferred()
                return gates[name]
            return run

        a1, a2, b1 = turns.run("a", work("a1")), turns.run("a", work("a2")), turns.run("b", work("b1"))
        self.assertEqual((started, turns.waiting("a"), turns.waiting("b")), (["a1", "b1"], 1, 0))
        gates["a1"].callback("one")
        self.assertEqual((self.successResultOf(a1), started), ("one", ["a1", "b1", "a2"]))
        gates["a2"].errback(ValueError("two"))
        self.failureResultOf(a2, ValueError)
        self.assertNoResult(b1)
        self.assertEqual(turns.waiting("a"), 0)

    def test_thousands_of_turns_that_end_at_once(self):
        """Turns that end as they start are handed over in a loop: all of them fire, and the line still works
        (a DeferredLock nests one call chain per such turn and stopped past the recursion limit)."""
        turns, gate = Turns(), defer.Deferred()
        first = turns.run("a", lambda: gate)
        quick = [turns.run("a", lambda n=n: defer.succeed(n)) for n in range(5000)]
        gate.callback(None)
        self.assertEqual([self.successResultOf(d) for d in quick], list(range(5000)))
        self.successResultOf(first)
        self.assertEqual(self.successResultOf(turns.run("a", lambda: defer.succeed("later"))), "later")

    def test_cancelled_while_waiting_leaves_the_line(self):
        turns, gate, ran = Turns(), defer.Deferred(), []
        turns.run("a", lambda: gate)
        waiting = turns.run("a", lambda: ran.append(1) or defer.succeed(None))
        waiting.cancel()
        self.failureResultOf(waiting, defer.CancelledError)
        self.assertEqual(turns.waiting("a"), 0)
        gate.callback(None)
        self.assertEqual(ran, [])

    def test_cancelled_during_its_turn_cancels_the_work(self):
        """The work's own outcome of the cancellation is the turn's (here a refusal it maps it to); the next
        turn then starts."""
        turns = Turns()
        work = defer.Deferred(lambda d: d.errback(KeyError("stopped by its canceller")))
        running = turns.run("a", lambda: work)
        following = turns.run("a", lambda: defer.succeed("next"))
        running.cancel()
        self.failureResultOf(running, KeyError)
        self.assertEqual(self.successResultOf(following), "next")

    def test_work_that_raises_at_once(self):
        turns = Turns()

        def broken():
            raise RuntimeError("no such device")

        failed = turns.run("a", broken)
        after = turns.run("a", lambda: defer.succeed("after"))
        self.assertEqual(str(self.failureResultOf(failed, RuntimeError).value), "no such device")
        self.assertEqual(self.successResultOf(after), "after")

    def test_coroutines(self):
        turns, gate = Turns(), defer.Deferred()

        async def work():
            return await gate

        done = turns.run("a", work)
        self.assertNoResult(done)
        gate.callback(7)
        self.assertEqual(self.successResultOf(done), 7)

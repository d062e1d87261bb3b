"""GroupRunner: items submitted one at a time, done in groups by one call each."""

from __future__ import annotations

from twisted.internet import defer
from twisted.trial.unittest import SynchronousTestCase

from appliance.archive.groups import GroupRunner
from appliance.net.threads import synchronous_runner


class ManualRunner:
    """A runner whose calls wait until the test finishes them, one at a time."""

    def __init__(self):
        self.calls = []

    def __call__(self, work, items):
        done = defer.Deferred()
        self.calls.append((work, items, done))
        return done

    def finish(self, index=0):
        work, items, done = self.calls.pop(index)
        try:
            answers = work(items)
        except Exception as error:
            done.errback(error)
        else:
            done.callback(answers)


class GroupRunnerTests(SynchronousTestCase):

    def test_items_waiting_go_together(self):
        """The first item runs alone at once; those submitted while it runs go together in the next call."""
        runner = ManualRunner()
        groups = GroupRunner(runner, lambda items: [item * 10 for item in items])
        first = groups.submit(1)
        self.assertEqual([items for _, items, _ in runner.calls], [[1]])
        rest = [groups.submit(n) for n in (2, 3, 4)]
        self.assertEqual(len(runner.calls), 1)  # nothing more until the running group is done
        runner.finish()
        self.assertEqual(self.successResultOf(first), 10)
        self.assertEqual([items for _, items, _ in runner.calls], [[2, 3, 4]])
        for waiting in rest:
            self.assertNoResult(waiting)
        runner.finish()
        self.assertEqual([self.successResultOf(d) for d in rest], [20, 30, 40])
        self.assertEqual(runner.calls, [])

    def test_max_group(self):
        """At most max_group items per call; the others wait for the next."""
        runner = ManualRunner()
        groups = GroupRunner(runner, lambda items: list(items), max_group=2)
        results = [groups.submit(n) for n in range(5)]
        sizes = []
        while runner.calls:
            sizes.append(len(runner.calls[0][1]))
            runner.finish()
        self.assertEqual(sizes, [1, 2, 2])
        self.assertEqual([self.successResultOf(d) for d in results], list(range(5)))

    def test_an_exception_answers_its_item_alone(self):
        """An exception in the answers fails its own item; the group's others get their values."""
        runner = ManualRunner()

        def work(items):
            return [ValueError(f"bad {item}") if item == "b" else item.upper() for item in items]

        groups = GroupRunner(runner, work)
        a = groups.submit("a")
        b, c = groups.submit("b"), groups.submit("c")
        runner.finish()
        runner.finish()
        self.assertEqual(self.successResultOf(a), "A")
        self.assertEqual(str(self.failureResultOf(b, ValueError).value), "bad b")
        self.assertEqual(self.successResultOf(c), "C")

    def test_work_raising_fails_its_group_only(self):
        """If the work itself raises, every item of that group fails with it; the next group still runs."""
        runner = ManualRunner()
        calls = []

        def work(items):
            calls.append(list(items))
            if len(calls) == 2:
                raise RuntimeError("disk on fire")
            return list(items)

        groups = GroupRunner(runner, work)
        first = groups.submit(1)
        second, third = groups.submit(2), groups.submit(3)
        runner.finish()
        fourth = groups.submit(4)
        runner.finish()
        runner.finish()
        self.assertEqual(self.successResultOf(first), 1)
        for failed in (second, third):
            self.assertEqual(str(self.failureResultOf(failed, RuntimeError).value), "disk on fire")
        self.assertEqual(self.successResultOf(fourth), 4)

    def test_wrong_number_of_answers(self):
        """Work answering more or fewer than its items fails them all, saying so."""
        groups = GroupRunner(synchronous_runner, lambda items: [1])
        first = groups.submit("x")
        self.assertEqual(self.successResultOf(first), 1)
        runner = ManualRunner()
        groups = GroupRunner(runner, lambda items: [1])
        a = groups.submit("a")
        b, c = groups.submit("b"), groups.submit("c")
        runner.finish()
        runner.finish()
        self.assertEqual(self.successResultOf(a), 1)
        for failed in (b, c):
            self.assertIn("1 answers for a group of 2", str(self.failureResultOf(failed, RuntimeError).value))

    def test_synchronous_runner(self):
        """With a runner that does the work at once, every item is its own group, answered at once."""
        seen = []
        groups = GroupRunner(synchronous_runner, lambda items: seen.append(list(items)) or list(items))
        self.assertEqual([self.successResultOf(groups.submit(n)) for n in range(3)], [0, 1, 2])
        self.assertEqual(seen, [[0], [1], [2]])

    def test_max_group_checked(self):
        self.assertRaises(ValueError, GroupRunner, synchronous_runner, list, max_group=0)

"""Tables that fit the terminal: key columns (names, ids, numbers) never wrap or get cut; when the
table is still too wide, the least useful optional columns are dropped (they stay in --json)."""
from __future__ import annotations

from rich.table import Table


def natural_width(headers: list[str], rows: list[list[str]]) -> int:
    """Width of a rich table with the default box and padding: every cell on one line."""
    widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
    return sum(widths) + 3 * len(widths) + 1


def fitted_table(title: str, columns: list[tuple[str, str]], rows: list[list[str]], width: int,
                 optional: tuple[str, ...] = ()) -> Table:
    """columns: (header, justify); `optional` headers, least useful first, are dropped while the
    table is wider than `width`."""
    keep = [h for h, _ in columns]
    for header in optional:
        if natural_width(keep, [[r[[h for h, _ in columns].index(k)] for k in keep] for r in rows]) <= width:
            break
        keep.remove(header)
    index = {h: i for i, (h, _) in enumerate(columns)}
    table = Table(title=title, title_justify="left")
    for header, justify in columns:
        if header in keep:
            table.add_column(header, justify=justify, no_wrap=True)
    for r in rows:
        table.add_row(*[r[index[h]] for h in keep])
    return table

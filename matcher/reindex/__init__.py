"""The overnight re-index: booking manifest in, templates in the store, a snapshot out.

``manifest`` reads and checks the bookings; ``cache`` hashes photos and remembers refused
ones; ``embedding`` turns photos into templates, in-process or on Ray; ``job`` drives the
run and is the store's only writer; ``report`` writes the summary and the rejects file.
"""

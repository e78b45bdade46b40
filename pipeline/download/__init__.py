"""Stage 2, download: img2dataset fetches the matched rows into webdataset shards.

``stage`` runs it, ``urlcheck`` refuses URLs of internal addresses before anything is fetched,
``limits`` bounds every response and checks each connection's peer.
"""
